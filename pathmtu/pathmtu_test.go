package pathmtu

import (
	"strings"
	"testing"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"tailscale.com/net/packet"
	"tailscale.com/net/tstun"
)

// TestNeededMatchesTailscale ties the arithmetic to Tailscale's own
// numbers, so that a Tailscale upgrade that changes one of them fails here.
func TestNeededMatchesTailscale(t *testing.T) {
	if got, want := InnerMTU, int(tstun.DefaultTUNMTU()); got != want {
		t.Errorf("InnerMTU = %d, want tstun.DefaultTUNMTU() = %d", got, want)
	}
	// tstun.SafeWireMTU is the inner MTU plus WireGuard's worst case:
	// IPv6 and UDP headers and the WireGuard transport overhead.
	if got, want := int(tstun.SafeWireMTU()), InnerMTU+IPv6HeaderLen+UDPHeaderLen+WireGuardOverhead; got != want {
		t.Errorf("tstun.SafeWireMTU() = %d, want InnerMTU+IPv6+UDP+WireGuard = %d", got, want)
	}
	if GeneveHeaderLen != packet.GeneveFixedHeaderLength {
		t.Errorf("GeneveHeaderLen = %d, want packet.GeneveFixedHeaderLength = %d", GeneveHeaderLen, packet.GeneveFixedHeaderLength)
	}
	if IPv4HeaderLen != ipv4.HeaderLen || IPv6HeaderLen != ipv6.HeaderLen {
		t.Errorf("IP header lengths %d/%d, want %d/%d", IPv4HeaderLen, IPv6HeaderLen, ipv4.HeaderLen, ipv6.HeaderLen)
	}
	// A relayed path adds the Geneve header to a plain WireGuard path.
	if got, want := NeededIPv6, int(tstun.SafeWireMTU())+packet.GeneveFixedHeaderLength; got != want {
		t.Errorf("NeededIPv6 = %d, want SafeWireMTU+Geneve = %d", got, want)
	}
	if NeededIPv4 != 1348 || NeededIPv6 != 1368 {
		t.Errorf("NeededIPv4, NeededIPv6 = %d, %d, want 1348, 1368", NeededIPv4, NeededIPv6)
	}
}

func TestJudge(t *testing.T) {
	tests := []struct {
		name         string
		paths        []Path
		wantTooSmall []string // interfaces
		wantTunnel   string   // substring of Report.Tunnel; "" for none
	}{
		{"none", nil, nil, ""},
		{"ethernet 1500", []Path{{Family: IPv4, Interface: "eth0", LinkMTU: 1500}, {Family: IPv6, Interface: "eth0", LinkMTU: 1500}}, nil, ""},
		{"healthy flannel 1450", []Path{{Family: IPv4, Interface: "eth0", Kind: "veth", LinkMTU: 1450}}, nil, ""},
		{"ipv4 fits exactly", []Path{{Family: IPv4, Interface: "eth0", LinkMTU: 1348}}, nil, ""},
		{"ipv4 one byte short", []Path{{Family: IPv4, Interface: "eth0", LinkMTU: 1347}}, []string{"eth0"}, ""},
		{"ipv6 needs 20 more", []Path{{Family: IPv4, Interface: "eth0", LinkMTU: 1360}, {Family: IPv6, Interface: "eth0", LinkMTU: 1360}}, []string{"eth0"}, ""},
		{"route mtu wins over link mtu", []Path{{Family: IPv4, Interface: "eth0", LinkMTU: 1500, RouteMTU: 1300}}, []string{"eth0"}, ""},
		{"flannel vxlan over tailscale0", []Path{{Family: IPv4, Interface: "eth0", Kind: "veth", LinkMTU: 1230}}, []string{"eth0"}, "1280 (Tailscale's MTU) - 50 (VXLAN"},
		{"vxlan over ipv6 tailscale", []Path{{Family: IPv4, Interface: "eth0", LinkMTU: 1210}}, []string{"eth0"}, "- 70 (VXLAN over IPv6)"},
		{"calico ipip over tailscale", []Path{{Family: IPv4, Interface: "eth0", LinkMTU: 1260}}, []string{"eth0"}, "- 20 (IP-in-IP"},
		{"route through tailscale0", []Path{{Family: IPv4, Interface: "tailscale0", Kind: "tun", LinkMTU: 1280}}, []string{"tailscale0"}, "tailscale0, a tun interface"},
		{"route through wg0 at 1420", []Path{{Family: IPv4, Interface: "wg0", Kind: "wireguard", LinkMTU: 1420}}, nil, "wg0, a wireguard interface"},
		{"named like tailscale", []Path{{Family: IPv6, Interface: "ts-uplink", LinkMTU: 9000}}, nil, "named like a Tailscale or WireGuard interface"},
		{"small but no tell-tale", []Path{{Family: IPv4, Interface: "eth0", LinkMTU: 1300}}, []string{"eth0"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Judge(tt.paths)
			var got []string
			for _, p := range r.TooSmall {
				got = append(got, p.Interface)
			}
			if strings.Join(got, ",") != strings.Join(tt.wantTooSmall, ",") {
				t.Errorf("Judge(%+v).TooSmall = %v, want %v", tt.paths, got, tt.wantTooSmall)
			}
			if (tt.wantTunnel == "") != (r.Tunnel == "") || !strings.Contains(r.Tunnel, tt.wantTunnel) {
				t.Errorf("Judge(%+v).Tunnel = %q, want one containing %q", tt.paths, r.Tunnel, tt.wantTunnel)
			}
			if ok := len(tt.wantTooSmall) == 0 && tt.wantTunnel == ""; r.OK() != ok || (r.Summary() == "") != ok {
				t.Errorf("Judge(%+v): OK() = %v, Summary() = %q; want OK %v", tt.paths, r.OK(), r.Summary(), ok)
			}
		})
	}
}

// TestSummary checks that the line people read has the numbers and, for a
// tunnel inside a tunnel, the fix in the order that works.
func TestSummary(t *testing.T) {
	s := Judge([]Path{{Family: IPv4, Interface: "eth0", Kind: "veth", LinkMTU: 1230}}).Summary()
	for _, want := range []string{"ipv4 via eth0 has MTU 1230, relayed packets need 1348", "tunnel inside a tunnel", "flannel-iface", "cni0", "re-create the pods"} {
		if !strings.Contains(s, want) {
			t.Errorf("Summary() = %q, want it to contain %q", s, want)
		}
	}
	iface, bridge, pods := strings.Index(s, "physical NIC"), strings.Index(s, "cni0"), strings.Index(s, "re-create")
	if !(iface < bridge && bridge < pods) {
		t.Errorf("Summary() = %q: want the fix in order interface, cni0 bridge, pods", s)
	}
	if len(s) > 1024 {
		t.Errorf("Summary() is %d bytes, more than an Event message holds (1024)", len(s))
	}
}
