// Package pathmtu finds the MTU of the network path the relay's traffic
// takes (the interface of the route to the internet, as `ip route get`
// shows it) and judges whether relayed packets fit through it, and whether
// the pod network looks like a tunnel running inside a Tailscale tunnel.
//
// A path MTU that is too small does not stop relaying: the packets are
// fragmented (IPv4) or dropped until the peers' TCP backs off, so every
// relayed connection slows down. It is reported, never made a readiness
// failure.
package pathmtu

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
)

// The largest packet a relay sends or receives, worked out from Tailscale
// v1.102.5 (paths in the tailscale.com module):
//
//	  1280  inner packet: the Tailscale interface's MTU (net/tstun/mtu.go,
//	        safeTUNMTU; DefaultTUNMTU returns it unless TS_DEBUG_MTU is set)
//	+   32  WireGuard transport message: type 4 + receiver index 4 +
//	        counter 8 (wireguard-go device/noise-protocol.go,
//	        MessageTransportHeaderSize = 16) + Poly1305 tag 16; a 1280-byte
//	        packet is a multiple of 16, so WireGuard pads nothing
//	+    8  Geneve header the relay's peers put before WireGuard (net/packet
//	        GeneveFixedHeaderLength; no options are used), counted for
//	        relayed paths in wgengine/magicsock/endpoint.go pingSizeToPktLen
//	+    8  UDP header
//	+   20  IPv4 header (40 for IPv6)
//	= 1348  bytes on an IPv4 path, 1368 on an IPv6 path.
//
// The relay server (net/udprelay) forwards the datagram as it came, Geneve
// header included, so it both receives and sends packets of this size.
// Disco pings are smaller unless path MTU probing is turned on with
// TS_DEBUG_ENABLE_PMTUD, and the relay's own WireGuard traffic carries no
// Geneve header, so it is 8 bytes smaller.
const (
	// InnerMTU is the MTU of Tailscale's interface on the peers.
	InnerMTU = 1280
	// WireGuardOverhead is a WireGuard transport message's header and tag.
	WireGuardOverhead = 16 + 16
	// GeneveHeaderLen is the Geneve header on every relayed datagram.
	GeneveHeaderLen = 8
	// UDPHeaderLen is the UDP header.
	UDPHeaderLen = 8
	// IPv4HeaderLen is the IPv4 header without options.
	IPv4HeaderLen = 20
	// IPv6HeaderLen is the IPv6 header without extension headers.
	IPv6HeaderLen = 40

	// NeededIPv4 is the largest relayed packet on an IPv4 path: 1348.
	NeededIPv4 = InnerMTU + WireGuardOverhead + GeneveHeaderLen + UDPHeaderLen + IPv4HeaderLen
	// NeededIPv6 is the largest relayed packet on an IPv6 path: 1368.
	NeededIPv6 = InnerMTU + WireGuardOverhead + GeneveHeaderLen + UDPHeaderLen + IPv6HeaderLen
)

// Family is an IP version, as the metrics and the status JSON name it.
type Family string

// The IP versions.
const (
	IPv4 Family = "ipv4"
	IPv6 Family = "ipv6"
)

// Needed returns the largest relayed packet on a path of family f.
func (f Family) Needed() int {
	if f == IPv6 {
		return NeededIPv6
	}
	return NeededIPv4
}

// probes are the destinations whose routes are looked up, one per family.
// Peers reach the relay from the internet, so the route to any public
// address is the one their packets take; a route lookup sends nothing.
var probes = [...]struct {
	family Family
	dst    netip.Addr
}{
	{IPv4, netip.AddrFrom4([4]byte{1, 1, 1, 1})},
	{IPv6, netip.MustParseAddr("2606:4700:4700::1111")},
}

// Path is the route of one family and the interface it leaves through.
type Path struct {
	Family    Family `json:"family"`
	Interface string `json:"interface"`
	// Kind is the interface's link kind (veth, vxlan, tun, bridge, …);
	// empty for a plain device such as a physical NIC.
	Kind string `json:"kind,omitempty"`
	// LinkMTU is the interface's MTU.
	LinkMTU int `json:"linkMTU"`
	// RouteMTU is the MTU the route itself sets (`ip route … mtu N`, or a
	// path MTU the kernel learned), 0 when none.
	RouteMTU int `json:"routeMTU,omitempty"`
}

// MTU returns the MTU packets on this path get: the route's own when it
// has one, else the interface's, as the kernel applies them.
func (p Path) MTU() int {
	if p.RouteMTU > 0 {
		return p.RouteMTU
	}
	return p.LinkMTU
}

// TooSmall reports whether relayed packets do not fit this path.
func (p Path) TooSmall() bool { return p.MTU() < p.Family.Needed() }

// Find looks up the route of each IP family to the internet and the MTU
// on it. A family without a route is left out; an error for one family is
// returned only if no family has a route.
func Find(ctx context.Context) ([]Path, error) {
	var paths []Path
	var errs []error
	for _, pr := range probes {
		p, ok, err := lookup(ctx, pr.dst)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%s route: %w", pr.family, err))
		case ok:
			p.Family = pr.family
			paths = append(paths, p)
		}
	}
	if len(paths) == 0 && len(errs) > 0 {
		return nil, errs[0]
	}
	return paths, nil
}

// Report is the judgement of a set of paths.
type Report struct {
	Paths []Path
	// TooSmall holds the paths relayed packets do not fit.
	TooSmall []Path
	// Tunnel says why the paths look like a tunnel inside a tunnel, or is
	// empty when they do not.
	Tunnel string
}

// OK reports whether nothing is wrong.
func (r Report) OK() bool { return len(r.TooSmall) == 0 && r.Tunnel == "" }

// tunnelOverheads are what common pod-network encapsulations take from an
// interface's MTU. A pod MTU of exactly InnerMTU minus one of them is the
// mark of a pod network running over a Tailscale interface: Flannel, Calico
// and Cilium derive the pod MTU from the MTU of the interface they run on.
var tunnelOverheads = []struct {
	bytes int
	what  string
}{
	{0, "no encapsulation, i.e. routed straight over a Tailscale interface"},
	{20, "IP-in-IP, e.g. Calico IPIP"},
	{50, "VXLAN or Geneve over IPv4, e.g. Flannel VXLAN"},
	{60, "WireGuard over IPv4, e.g. Flannel or Calico WireGuard"},
	{70, "VXLAN over IPv6"},
	{80, "WireGuard over IPv6"},
}

// tunnelNamePrefixes are interface names WireGuard and Tailscale use.
var tunnelNamePrefixes = []string{"tailscale", "wg", "ts"}

// FixHint is what to do about a pod network running over Tailscale, in
// the order that works: the node's tunnel first, then the bridge that
// keeps the old MTU, then the pods that keep theirs.
const FixHint = "run the pod network on the physical NIC, not on tailscale0 " +
	"(k3s: flannel-iface: eth0; flanneld: --iface, or the flannel.alpha.coreos.com/public-ip-overwrite node annotation), " +
	"then set the cni0 bridge MTU on every node to flannel.1's (ip link set cni0 mtu 1450), " +
	"then re-create the pods, this one included, so that their interfaces get the new MTU"

// Judge compares each path's MTU with what relayed packets need and looks
// for signs of a tunnel inside a tunnel.
func Judge(paths []Path) Report {
	r := Report{Paths: paths}
	for _, p := range paths {
		if p.TooSmall() {
			r.TooSmall = append(r.TooSmall, p)
		}
		if r.Tunnel == "" {
			r.Tunnel = tunnelEvidence(p)
		}
	}
	return r
}

// tunnelEvidence says why p looks like a tunnel inside a tunnel, or "".
func tunnelEvidence(p Path) string {
	if p.Kind == "wireguard" || p.Kind == "tun" {
		return fmt.Sprintf("the %s route leaves through %s, a %s interface: the relay's WireGuard packets are wrapped in another tunnel", p.Family, p.Interface, p.Kind)
	}
	for _, prefix := range tunnelNamePrefixes {
		if strings.HasPrefix(p.Interface, prefix) {
			return fmt.Sprintf("the %s route leaves through %s, named like a Tailscale or WireGuard interface: the relay's WireGuard packets are wrapped in another tunnel", p.Family, p.Interface)
		}
	}
	for _, o := range tunnelOverheads {
		if p.MTU() == InnerMTU-o.bytes {
			return fmt.Sprintf("%s has MTU %d = %d (Tailscale's MTU) - %d (%s): the pod network likely runs over a Tailscale interface", p.Interface, p.MTU(), InnerMTU, o.bytes, o.what)
		}
	}
	return ""
}

// Summary is one line for people: what is wrong, with the numbers, and
// for a tunnel inside a tunnel the likely cause and the fix. It is empty
// when r is OK.
func (r Report) Summary() string {
	var parts []string
	if len(r.TooSmall) > 0 {
		var ps []string
		for _, p := range r.TooSmall {
			ps = append(ps, fmt.Sprintf("%s via %s has MTU %d, relayed packets need %d", p.Family, p.Interface, p.MTU(), p.Family.Needed()))
		}
		parts = append(parts, "path MTU too small for relayed packets: "+strings.Join(ps, "; ")+
			"; they are fragmented or dropped, which slows every relayed connection")
	}
	if r.Tunnel != "" {
		parts = append(parts, "tunnel inside a tunnel: "+r.Tunnel+"; fix: "+FixHint)
	}
	return strings.Join(parts, ". ")
}
