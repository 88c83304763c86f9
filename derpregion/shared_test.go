package derpregion

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestRegionTwoMembers(t *testing.T) {
	cert := selfSignedForTest(t)
	r, err := Region(RegionOptions{
		RegionID: 900, RegionCode: "tsrelay", Cert: cert, DERPPort: 8443, STUNPort: 3478,
		Members: []Member{
			{Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}},
			{},
			{Addrs: []netip.Addr{netip.MustParseAddr("2001:db8::3")}, DERPPort: 9443},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Nodes) != 2 {
		t.Fatalf("nodes = %d, want 2 (the member with no address left out)", len(r.Nodes))
	}
	a, c := r.Nodes[0], r.Nodes[1]
	if a.Name != "900a" || a.IPv4 != "192.0.2.1" || a.IPv6 != "none" || a.DERPPort != 8443 {
		t.Errorf("first node = %+v, want 900a at 192.0.2.1:8443", a)
	}
	if c.Name != "900c" || c.IPv6 != "2001:db8::3" || c.IPv4 != "none" || c.DERPPort != 9443 || c.STUNPort != 3478 {
		t.Errorf("third node = %+v, want 900c at [2001:db8::3]:9443", c)
	}
	for _, n := range r.Nodes {
		if n.HostName != cert.HostName || n.CertName != cert.CertName() {
			t.Errorf("node %s: host %q cert %q, want the shared %q %q", n.Name, n.HostName, n.CertName, cert.HostName, cert.CertName())
		}
	}
	js, err := PolicyJSON(r)
	if err != nil || !strings.Contains(string(js), `"900c"`) {
		t.Errorf("PolicyJSON = %s, %v; want both nodes", js, err)
	}
	ys, err := HeadscaleYAML(r)
	if err != nil || strings.Count(string(ys), "name: 900") != 2 {
		t.Errorf("HeadscaleYAML = %s, %v; want both nodes", ys, err)
	}
}

func TestCompleteShared(t *testing.T) {
	now := time.Now()
	full, changed, err := CompleteShared(nil, now)
	if err != nil || !changed {
		t.Fatalf("CompleteShared(nil) = changed %v, %v; want a new key and certificate", changed, err)
	}
	sh, err := ParseShared(full, now)
	if err != nil {
		t.Fatal(err)
	}
	again, changed, err := CompleteShared(full, now)
	if err != nil || changed || string(again[SharedMeshKey]) != string(full[SharedMeshKey]) {
		t.Errorf("CompleteShared(complete) changed=%v err=%v, want nothing changed", changed, err)
	}

	// User-provided key only: kept, certificate added.
	userKey := strings.Repeat("0123456789abcdef", 4)
	got, changed, err := CompleteShared(map[string][]byte{SharedMeshKey: []byte(userKey + "\n")}, now)
	if err != nil || !changed || string(got[SharedMeshKey]) != userKey+"\n" || len(got[SharedCertKey]) == 0 {
		t.Errorf("CompleteShared(key only) = changed %v, err %v; want the user's key kept and a certificate added", changed, err)
	}
	if sh2, err := ParseShared(got, now); err != nil || sh2.MeshKey.String() != userKey || sh2.Cert.CertName() == sh.Cert.CertName() {
		t.Errorf("ParseShared(completed) = %v; want the user's key and a fresh certificate", err)
	}

	// A bad key is an error that does not echo it; nothing is replaced.
	_, _, err = CompleteShared(map[string][]byte{SharedMeshKey: []byte("s3cr3t-not-hex")}, now)
	if err == nil || strings.Contains(err.Error(), "s3cr3t") || !strings.Contains(err.Error(), "64 hexadecimal") {
		t.Errorf("CompleteShared(bad key) = %v, want an error naming the form, not the value", err)
	}
	_, _, err = CompleteShared(map[string][]byte{SharedCertKey: full[SharedCertKey]}, now)
	if err == nil || !strings.Contains(err.Error(), "want both") {
		t.Errorf("CompleteShared(certificate without key) = %v, want an error", err)
	}
}

func TestLoadSharedFileConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mesh.json")
	const n = 8
	got := make([]*Shared, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { got[i], errs[i] = LoadSharedFile(path, time.Now()) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("creator %d: %v", i, errs[i])
		}
		if !got[i].MeshKey.Equal(got[0].MeshKey) || got[i].Cert.CertName() != got[0].Cert.CertName() {
			t.Errorf("creator %d got another key or certificate than creator 0", i)
		}
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mesh file mode = %v, %v; want 0600", fi.Mode(), err)
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".tsrelay-mesh-*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
	again, err := LoadSharedFile(path, time.Now())
	if err != nil || !again.MeshKey.Equal(got[0].MeshKey) {
		t.Errorf("reload = %v, want the same key", err)
	}
	os.WriteFile(path, []byte(`{"mesh-key":"nothex"}`), 0o600)
	if _, err := LoadSharedFile(path, time.Now()); err == nil || strings.Contains(err.Error(), "nothex") {
		t.Errorf("LoadSharedFile(bad file) = %v, want an error without the value", err)
	}
}
