package derpregion

import (
	"net/netip"
	"testing"
)

// meshConfig is a valid outside-cluster mesh of the relay at 192.0.2.10,
// with edit applied to its settings and host.
func meshConfig(t *testing.T, edit func(*Config, *Host)) (Config, Host) {
	t.Helper()
	c := Config{
		DERPPort: 8443, STUNPort: 3478, RegionID: 900, RegionCode: "tsrelay", MaxUnadmitted: 256, AcceptRate: 100,
		MeshFile: "/tmp/mesh.json",
	}
	if err := c.MeshPeers.Decode("192.0.2.10:8443, 192.0.2.11:8443"); err != nil {
		t.Fatal(err)
	}
	h := Host{RelayPort: 40000, HTTPAddr: netip.MustParseAddrPort("[::]:9002"), StaticEndpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.10:40000")}}
	if edit != nil {
		edit(&c, &h)
	}
	return c, h
}

func TestPlanMeshSelf(t *testing.T) {
	static := func(s string) []netip.AddrPort { return []netip.AddrPort{netip.MustParseAddrPort(s)} }
	tests := []struct {
		name     string
		edit     func(*Config, *Host)
		wantSelf string
	}{
		{"by static endpoint IP", nil, "192.0.2.10:8443"},
		{"second member", func(_ *Config, h *Host) { h.StaticEndpoints = static("192.0.2.11:40000") }, "192.0.2.11:8443"},
		{"by TS_DERP_ADDRS over static endpoints", func(c *Config, _ *Host) { c.Addrs = IPList{netip.MustParseAddr("192.0.2.11")} }, "192.0.2.11:8443"},
		{"shared IP, by TS_DERP_PORT", func(c *Config, h *Host) {
			h.StaticEndpoints, c.DERPPort = static("127.0.0.1:40000"), 8444
			c.MeshPeers = MeshMembers{"127.0.0.1:8443", "127.0.0.1:8444"}
		}, "127.0.0.1:8444"},
		{"forwarded port differs from TS_DERP_PORT", func(c *Config, _ *Host) {
			c.MeshPeers = MeshMembers{"192.0.2.10:18443", "192.0.2.11:18443"}
		}, "192.0.2.10:18443"},
		{"in a cluster, by TS_RELAY_SERVICE", func(c *Config, h *Host) {
			h.InCluster, h.Service = true, "tsrelay-1"
			c.MeshFile, c.MeshSecret, c.MeshPeers = "", "tsrelay-derp-mesh", MeshMembers{"tsrelay-0", "tsrelay-1"}
		}, "tsrelay-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, h := meshConfig(t, tt.edit)
			plan, err := c.check(h)
			if err != nil {
				t.Fatalf("check: %v", err)
			}
			if got := plan.members[plan.self].name; got != tt.wantSelf {
				t.Errorf("self = %q, want %q", got, tt.wantSelf)
			}
			if got, want := len(plan.peers(nil)), len(plan.members)-1; got != want {
				t.Errorf("%d mesh peers, want %d (every member but self)", got, want)
			}
		})
	}
}
