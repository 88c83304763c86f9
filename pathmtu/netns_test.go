package pathmtu

import (
	"slices"
	"strings"
	"testing"

	"github.com/tsrelay/tsrelay/internal/netnstest"
)

// TestFindInNetns builds real interfaces and routes in network namespaces
// and checks what Find sees and how Judge judges it.
func TestFindInNetns(t *testing.T) {
	ip := netnstest.IP
	// veth makes a veth pair v0-v1 at mtu with 10.77.0.1/24 on v0.
	veth := func(t *testing.T, mtu string) {
		ip(t, "link", "add", "v0", "mtu", mtu, "type", "veth", "peer", "name", "v1", "mtu", mtu)
		ip(t, "link", "set", "v0", "up")
		ip(t, "link", "set", "v1", "up")
		ip(t, "addr", "add", "10.77.0.1/24", "dev", "v0")
	}
	tests := []struct {
		name       string
		setup      func(t *testing.T)
		want       []Path
		wantSmall  []Family // families relayed packets do not fit
		wantTunnel string   // substring of Report.Tunnel; "" for none
	}{
		{
			name:  "ethernet 1500",
			setup: func(t *testing.T) { veth(t, "1500"); ip(t, "route", "add", "default", "via", "10.77.0.2", "dev", "v0") },
			want:  []Path{{Family: IPv4, Interface: "v0", Kind: "veth", LinkMTU: 1500}},
		},
		{
			name:      "pod at 1230",
			setup:     func(t *testing.T) { veth(t, "1230"); ip(t, "route", "add", "default", "via", "10.77.0.2", "dev", "v0") },
			want:      []Path{{Family: IPv4, Interface: "v0", Kind: "veth", LinkMTU: 1230}},
			wantSmall: []Family{IPv4},
			// 1230 = 1280 - 50: Flannel VXLAN over tailscale0.
			wantTunnel: "v0 has MTU 1230 = 1280 (Tailscale's MTU) - 50",
		},
		{
			name: "route mtu as ip route get shows it",
			setup: func(t *testing.T) {
				veth(t, "1500")
				ip(t, "route", "add", "default", "via", "10.77.0.2", "dev", "v0", "mtu", "1300")
			},
			want:      []Path{{Family: IPv4, Interface: "v0", Kind: "veth", LinkMTU: 1500, RouteMTU: 1300}},
			wantSmall: []Family{IPv4},
		},
		{
			name: "ipv6 path",
			setup: func(t *testing.T) {
				veth(t, "1360")
				ip(t, "addr", "add", "fd77::1/64", "dev", "v0", "nodad")
				ip(t, "route", "add", "default", "via", "10.77.0.2", "dev", "v0")
				ip(t, "-6", "route", "add", "default", "via", "fd77::2", "dev", "v0")
			},
			// 1360 fits IPv4's 1348 but not IPv6's 1368.
			want:      []Path{{Family: IPv4, Interface: "v0", Kind: "veth", LinkMTU: 1360}, {Family: IPv6, Interface: "v0", Kind: "veth", LinkMTU: 1360}},
			wantSmall: []Family{IPv6},
		},
		{
			name: "route through tailscale0",
			setup: func(t *testing.T) {
				// A TUN device as tailscaled makes it, without tailscaled.
				ip(t, "tuntap", "add", "dev", "tailscale0", "mode", "tun")
				ip(t, "link", "set", "tailscale0", "mtu", "1280", "up")
				ip(t, "addr", "add", "100.64.0.1/32", "dev", "tailscale0")
				ip(t, "route", "add", "default", "dev", "tailscale0")
			},
			want:       []Path{{Family: IPv4, Interface: "tailscale0", Kind: "tun", LinkMTU: 1280}},
			wantSmall:  []Family{IPv4},
			wantTunnel: "leaves through tailscale0, a tun interface",
		},
		{
			name: "vxlan over a 1280 link",
			setup: func(t *testing.T) {
				// The node's side of the user report: Flannel's VXLAN
				// device over an interface with Tailscale's MTU. The
				// kernel sizes the VXLAN device itself.
				veth(t, "1280")
				ip(t, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "remote", "10.77.0.2", "dev", "v0", "dstport", "8472")
				ip(t, "link", "set", "flannel.1", "up")
				ip(t, "addr", "add", "10.42.0.0/32", "dev", "flannel.1")
				ip(t, "route", "add", "default", "dev", "flannel.1")
			},
			want:       []Path{{Family: IPv4, Interface: "flannel.1", Kind: "vxlan", LinkMTU: 1230}},
			wantSmall:  []Family{IPv4},
			wantTunnel: "flannel.1 has MTU 1230 = 1280 (Tailscale's MTU) - 50 (VXLAN",
		},
		{
			name:  "no default route",
			setup: func(t *testing.T) { veth(t, "1500") },
			want:  nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			netnstest.Run(t, func(t *testing.T) {
				tt.setup(t)
				got, err := Find(t.Context())
				if err != nil {
					t.Fatalf("Find: %v", err)
				}
				if !slices.Equal(got, tt.want) {
					t.Fatalf("Find() = %+v, want %+v", got, tt.want)
				}
				r := Judge(got)
				var small []Family
				for _, p := range r.TooSmall {
					small = append(small, p.Family)
				}
				if !slices.Equal(small, tt.wantSmall) {
					t.Errorf("Judge().TooSmall = %+v, want families %v", r.TooSmall, tt.wantSmall)
				}
				if (tt.wantTunnel == "") != (r.Tunnel == "") || !strings.Contains(r.Tunnel, tt.wantTunnel) {
					t.Errorf("Judge().Tunnel = %q, want one containing %q", r.Tunnel, tt.wantTunnel)
				}
				t.Logf("summary: %s", r.Summary())
			})
		})
	}
}
