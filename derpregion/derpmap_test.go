package derpregion

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"tailscale.com/tailcfg"
)

func selfSignedForTest(t *testing.T) *Cert {
	t.Helper()
	c, err := SelfSigned(fileStore(t, filepath.Join(t.TempDir(), "state.json")), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRegion(t *testing.T) {
	cert := selfSignedForTest(t)
	r, err := Region(RegionOptions{
		RegionID: 901, RegionCode: "home", Cert: cert,
		Addrs:    []netip.Addr{netip.MustParseAddr("::ffff:192.0.2.10"), netip.MustParseAddr("2001:db8::10"), netip.MustParseAddr("192.0.2.11")},
		DERPPort: 8443, STUNPort: 3478,
	})
	if err != nil {
		t.Fatal(err)
	}
	want := &tailcfg.DERPRegion{
		RegionID: 901, RegionCode: "home", RegionName: "tsrelay in-cluster (home)",
		Nodes: []*tailcfg.DERPNode{{
			Name: "901a", RegionID: 901, HostName: SelfSignedHostName, CertName: cert.CertName(),
			IPv4: "192.0.2.10", IPv6: "2001:db8::10", DERPPort: 8443, STUNPort: 3478,
		}},
	}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("Region = %+v, want %+v", r.Nodes[0], want.Nodes[0])
	}

	// One family only: the other is disabled, so no client resolves the
	// host name for it.
	r4, err := Region(RegionOptions{RegionID: 900, RegionCode: "a", Cert: cert, Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}})
	if err != nil {
		t.Fatal(err)
	}
	if n := r4.Nodes[0]; n.IPv4 != "192.0.2.10" || n.IPv6 != "none" {
		t.Errorf("IPv4-only node: IPv4 %q IPv6 %q, want 192.0.2.10 and none", n.IPv4, n.IPv6)
	}

	if _, err := Region(RegionOptions{RegionID: 900, RegionCode: "a", Cert: cert}); err == nil || !strings.Contains(err.Error(), "needs an address") {
		t.Errorf("self-signed region without addresses: %v, want an error", err)
	}
}

func TestValidateRegion(t *testing.T) {
	for _, tc := range []struct {
		id   int
		code string
		want string // substring of the error; empty for valid
	}{
		{900, "tsrelay", ""},
		{999, "home-lab-2", ""},
		{1, "tsrelay", "TS_DERP_REGION_ID=1: want a region ID from 900 to 999"},
		{1000, "tsrelay", "TS_DERP_REGION_ID=1000"},
		{900, "", `TS_DERP_REGION_CODE=""`},
		{900, "Home", `TS_DERP_REGION_CODE="Home"`},
		{900, "-x", `TS_DERP_REGION_CODE="-x"`},
		{900, strings.Repeat("a", 33), "TS_DERP_REGION_CODE="},
	} {
		err := ValidateRegion(tc.id, tc.code, "TS_DERP_REGION_ID", "TS_DERP_REGION_CODE")
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("ValidateRegion(%d, %q) = %v, want nil", tc.id, tc.code, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("ValidateRegion(%d, %q) = %v, want an error containing %q", tc.id, tc.code, err, tc.want)
		}
	}
}

func testRegion(t *testing.T) *tailcfg.DERPRegion {
	t.Helper()
	r, err := Region(RegionOptions{
		RegionID: DefaultRegionID, RegionCode: DefaultRegionCode, Cert: selfSignedForTest(t),
		Addrs:    []netip.Addr{netip.MustParseAddr("192.0.2.10")},
		DERPPort: 8443, STUNPort: 3478,
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestPolicyJSON(t *testing.T) {
	r := testRegion(t)
	bs, err := PolicyJSON(r)
	if err != nil {
		t.Fatal(err)
	}
	// As the control plane reads the policy's derpMap: tailcfg's JSON,
	// unknown fields refused.
	var got tailcfg.DERPMap
	dec := json.NewDecoder(bytes.NewReader(bs))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("decode %s: %v", bs, err)
	}
	want := tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{DefaultRegionID: r}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("decoded %s\ngot  %+v\nwant %+v", bs, got, want)
	}
	if got.OmitDefaultRegions {
		t.Errorf("OmitDefaultRegions = true: the policy would drop Tailscale's own regions")
	}
	if !bytes.Contains(bs, []byte(`"900": {`)) {
		t.Errorf("region not keyed by its ID as a string:\n%s", bs)
	}
}

func TestHeadscaleYAML(t *testing.T) {
	r := testRegion(t)
	bs, err := HeadscaleYAML(r)
	if err != nil {
		t.Fatal(err)
	}
	// Headscale (hscontrol/derp) reads derp.paths files with
	// yaml.NewDecoder(f).Decode(&tailcfg.DERPMap{}).
	var got tailcfg.DERPMap
	dec := yaml.NewDecoder(bytes.NewReader(bs))
	dec.KnownFields(true)
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("decode %s: %v", bs, err)
	}
	want := tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{DefaultRegionID: r}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("decoded\n%s\ngot  %+v\nwant %+v", bs, got.Regions[DefaultRegionID].Nodes[0], r.Nodes[0])
	}
}
