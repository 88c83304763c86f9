package derpregion

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/ipn/store"
)

func fileStore(t *testing.T, path string) ipn.StateStore {
	t.Helper()
	st, err := store.NewFileStore(t.Logf, path)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestSelfSignedSurvivesRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	now := time.Now()
	first, err := SelfSigned(fileStore(t, path), now)
	if err != nil {
		t.Fatal(err)
	}
	if !first.Created() {
		t.Errorf("first start: Created() = false, want true")
	}
	if !strings.HasPrefix(first.CertName(), "sha256-raw:") || len(first.Fingerprint()) != 64 {
		t.Errorf("CertName() = %q, want sha256-raw:<64 hex digits>", first.CertName())
	}
	// What a client computes: the hex SHA-256 of the DER it is served.
	sum := sha256.Sum256(first.current().Certificate[0])
	if got, want := first.Fingerprint(), hex.EncodeToString(sum[:]); got != want {
		t.Errorf("Fingerprint() = %s, want sha256 of the served certificate %s", got, want)
	}
	if first.HostName != SelfSignedHostName {
		t.Errorf("HostName = %q, want %q", first.HostName, SelfSignedHostName)
	}
	if !first.NotAfter().After(now.Add(9 * 365 * 24 * time.Hour)) {
		t.Errorf("NotAfter() = %v, want about ten years from now", first.NotAfter())
	}

	// A restart: a new store on the same file, as a new process would open.
	again, err := SelfSigned(fileStore(t, path), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if again.Created() {
		t.Errorf("restart: Created() = true, want the stored certificate")
	}
	if again.CertName() != first.CertName() {
		t.Errorf("restart: CertName() = %s, want %s", again.CertName(), first.CertName())
	}

	// Expired: a new certificate, and a new fingerprint.
	later, err := SelfSigned(fileStore(t, path), first.NotAfter().Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if !later.Created() || later.CertName() == first.CertName() {
		t.Errorf("after expiry: Created() = %v, same fingerprint = %v; want a new certificate", later.Created(), later.CertName() == first.CertName())
	}
}

func TestSelfSignedCorruptState(t *testing.T) {
	st := new(ipnMemStore)
	if err := st.WriteState(CertStateKey, []byte("not a certificate")); err != nil {
		t.Fatal(err)
	}
	_, err := SelfSigned(st, time.Now())
	if err == nil || !strings.Contains(err.Error(), string(CertStateKey)) || !strings.Contains(err.Error(), "delete the key") {
		t.Errorf("SelfSigned(corrupt state) = %v, want an error naming the key and the way out", err)
	}
	if bs, _ := st.ReadState(CertStateKey); string(bs) != "not a certificate" {
		t.Errorf("the corrupt value was overwritten with %q; it must be left for the user", bs)
	}
}

func TestSelfSignedWriteFailure(t *testing.T) {
	st := &ipnMemStore{writeErr: errors.New("secret is read-only")}
	_, err := SelfSigned(st, time.Now())
	if err == nil || !strings.Contains(err.Error(), "secret is read-only") {
		t.Errorf("SelfSigned with a failing store = %v, want the write error", err)
	}
}

// ipnMemStore is an in-memory Store whose writes can fail.
type ipnMemStore struct {
	m        map[ipn.StateKey][]byte
	writeErr error
}

func (s *ipnMemStore) ReadState(k ipn.StateKey) ([]byte, error) {
	bs, ok := s.m[k]
	if !ok {
		return nil, ipn.ErrStateNotExist
	}
	return bs, nil
}

func (s *ipnMemStore) WriteState(k ipn.StateKey, bs []byte) error {
	if s.writeErr != nil {
		return s.writeErr
	}
	if s.m == nil {
		s.m = map[ipn.StateKey][]byte{}
	}
	s.m[k] = bs
	return nil
}

// writeCAIssued writes a certificate for host (signed by a throwaway CA)
// and its key to dir, as a kubernetes.io/tls Secret mounts them.
func writeCAIssued(t *testing.T, dir, host string) (certFile, keyFile string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, leaf, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(leafKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestFromFiles(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := writeCAIssued(t, dir, "derp.example.com")

	c, err := FromFiles(certFile, keyFile, "derp.example.com")
	if err != nil {
		t.Fatalf("FromFiles: %v", err)
	}
	if c.CertName() != "" {
		t.Errorf("CertName() = %q, want empty: clients verify a CA-issued certificate by name", c.CertName())
	}
	served := func() []byte {
		tc, err := c.getCertificate(&tls.ClientHelloInfo{ServerName: "derp.example.com"})
		if err != nil {
			t.Fatal(err)
		}
		return tc.Certificate[0]
	}
	before := served()

	// A renewal: new files (a Secret update swaps them), a later mtime.
	renewedDir := t.TempDir()
	newCert, newKey := writeCAIssued(t, renewedDir, "derp.example.com")
	for src, dst := range map[string]string{newCert: certFile, newKey: keyFile} {
		bs, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, bs, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(certFile, later, later); err != nil {
		t.Fatal(err)
	}
	if after := served(); string(after) == string(before) {
		t.Errorf("after the files changed the server still serves the old certificate")
	}

	_, otherKey := writeCAIssued(t, t.TempDir(), "derp.example.com")
	for _, tc := range []struct {
		name, cert, key, host, want string
	}{
		{"wrong host", certFile, keyFile, "other.example.com", `not for host name "other.example.com"`},
		{"no host", certFile, keyFile, "", "needs the host name"},
		{"missing file", filepath.Join(dir, "nope.crt"), keyFile, "derp.example.com", "nope.crt"},
		{"key mismatch", certFile, otherKey, "derp.example.com", "load the DERP certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := FromFiles(tc.cert, tc.key, tc.host)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("FromFiles(%s, %s, %q) = %v, want an error containing %q", tc.cert, tc.key, tc.host, err, tc.want)
			}
		})
	}
}
