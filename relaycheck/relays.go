package relaycheck

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"tailscale.com/client/local"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
)

// RelayServer is a peer relay server this laptop knows: a node the tailnet
// policy lets it use as a relay (`tailscale debug peer-relay-servers`).
type RelayServer struct {
	Name    string `json:"name,omitempty"`
	DNSName string `json:"dnsName,omitempty"`
	IP      string `json:"ip"`
	// Advertising is whether the node's own info (Hostinfo.PeerRelay) says
	// it runs a relay server. Control may not pass this on to every
	// client, so false is a hint, not proof.
	Advertising bool   `json:"advertising"`
	Self        bool   `json:"self,omitempty"`
	Probe       *Probe `json:"probe,omitempty"`

	ip netip.Addr
	// addrs are the node's own endpoint addresses (PeerStatus.Addrs):
	// the only evidence this laptop has of which relay owns a relay
	// endpoint.
	addrs []netip.Addr
}

// label is how messages name the relay: "relay (100.64.0.1)".
func (rs *RelayServer) label() string {
	if rs.Name == "" {
		return rs.IP
	}
	return fmt.Sprintf("%s (%s)", rs.Name, rs.IP)
}

// Probe is the outcome of disco-pinging a relay node itself, which tells
// an offline relay from one that is up but unreachable on its relay port.
type Probe struct {
	Answered   bool    `json:"answered"`
	Via        string  `json:"via,omitempty"`
	LatencyMs  float64 `json:"latencyMs,omitempty"`
	Unanswered int     `json:"unanswered"`
	Error      string  `json:"error,omitempty"`
}

// offline reports whether the probe saw a node that lets pings go
// unanswered; a probe cut short before a full ping's wait says nothing.
func (p *Probe) offline() bool { return p != nil && !p.Answered && p.Unanswered > 0 }

// expectation is --relay, resolved.
type expectation struct {
	raw      string
	endpoint netip.AddrPort       // --relay ip:port
	node     *ipnstate.PeerStatus // --relay names a node, and it is in the netmap
	notFound bool                 // --relay names a node that is not in the netmap
	server   *RelayServer         // the node, if it is a relay server for this laptop
	// grantKnown is whether server == nil means "not a relay server for
	// this laptop": false when neither the list nor WhoIs could tell.
	grantKnown bool
}

func (e *expectation) label() string {
	if e.node != nil {
		return fmt.Sprintf("%s (%s)", cmpName(e.node), e.node.TailscaleIPs[0])
	}
	return e.raw
}

func cmpName(p *ipnstate.PeerStatus) string {
	if p.HostName != "" {
		return p.HostName
	}
	return dnsName(p)
}

// resolveExpected resolves --relay: an endpoint if it is ip:port, else a
// node. Nil without --relay.
func resolveExpected(st *ipnstate.Status, relay string) *expectation {
	if relay == "" {
		return nil
	}
	e := &expectation{raw: relay}
	if ap, err := netip.ParseAddrPort(relay); err == nil {
		e.endpoint = ap
		return e
	}
	t, err := resolve(st, relay)
	if err != nil || t.node == nil {
		e.notFound = true
		return e
	}
	e.node = t.node
	return e
}

// relayView is what this laptop knows about peer relay servers.
type relayView struct {
	servers []*RelayServer
	listErr error // the peer-relay-servers list could not be read
}

// gatherRelays lists the peer relay servers this laptop knows, with their
// names and whether they advertise a relay server, and ties exp's node to
// its entry. Reading the list needs LocalAPI write access (root or the
// operator); without it, WhoIs still tells whether exp's node is a relay
// server for this laptop (its capability "tailscale.com/cap/relay-target").
func gatherRelays(ctx context.Context, lc LocalAPI, st *ipnstate.Status, exp *expectation) relayView {
	var v relayView
	ips, err := peerRelayServers(ctx, lc)
	if err != nil {
		v.listErr = err
	}
	for i, ip := range ips {
		rs := &RelayServer{IP: ip.String(), ip: ip}
		if p := nodeByIP(st, ip); p != nil {
			rs.Name, rs.DNSName = p.HostName, dnsName(p)
			rs.Self = p == st.Self
			rs.addrs = endpointAddrs(p)
		}
		// Past maxWhoIs (a policy that makes every node a relay), names
		// must do.
		if i < maxWhoIs {
			if w, err := lc.WhoIs(ctx, ip.String()); err == nil && w.Node != nil {
				rs.Advertising = w.Node.Hostinfo.PeerRelay()
			}
		}
		v.servers = append(v.servers, rs)
	}
	if exp == nil || exp.node == nil {
		return v
	}
	ip := exp.node.TailscaleIPs[0]
	for _, rs := range v.servers {
		if slices.Contains(exp.node.TailscaleIPs, rs.ip) {
			exp.server = rs
		}
	}
	exp.grantKnown = v.listErr == nil
	if exp.server == nil && v.listErr != nil {
		if w, err := lc.WhoIs(ctx, ip.String()); err == nil && w.Node != nil {
			exp.grantKnown = true
			if w.CapMap.HasCapability(tailcfg.PeerCapabilityRelayTarget) {
				exp.server = &RelayServer{Name: exp.node.HostName, DNSName: dnsName(exp.node), IP: ip.String(), ip: ip,
					Advertising: w.Node.Hostinfo.PeerRelay(), addrs: endpointAddrs(exp.node)}
				v.servers = append(v.servers, exp.server)
			}
		}
	}
	return v
}

// errDebugDenied explains a 403 from the LocalAPI's debug endpoint.
var errDebugDenied = errors.New("the LocalAPI debug call needs root or the tailscale operator (`sudo tailscale set --operator=$USER`)")

// peerRelayServers reads `tailscale debug peer-relay-servers`: the first
// tailnet address of every node this laptop may use as a relay.
func peerRelayServers(ctx context.Context, lc LocalAPI) ([]netip.Addr, error) {
	v, err := lc.DebugResultJSON(ctx, "peer-relay-servers")
	if err != nil {
		if local.IsAccessDeniedError(err) {
			return nil, fmt.Errorf("list peer relay servers: %w", errDebugDenied)
		}
		return nil, fmt.Errorf("list peer relay servers: %w", err)
	}
	list, _ := v.([]any) // JSON null (none) decodes as nil
	var ips []netip.Addr
	for _, x := range list {
		s, _ := x.(string)
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("list peer relay servers: unexpected entry %v", x)
		}
		ips = append(ips, ip)
	}
	return ips, nil
}

func nodeByIP(st *ipnstate.Status, ip netip.Addr) *ipnstate.PeerStatus {
	if st.Self != nil && slices.Contains(st.Self.TailscaleIPs, ip) {
		return st.Self
	}
	for _, p := range st.Peer {
		if slices.Contains(p.TailscaleIPs, ip) {
			return p
		}
	}
	return nil
}

// toProbe picks the relay nodes worth pinging: the expected one, then
// those that advertise a relay server, then the rest; never this laptop
// or a peer being checked anyway; at most maxProbes.
func toProbe(servers []*RelayServer, exp *expectation, peers []netip.Addr) []*RelayServer {
	var out []*RelayServer
	add := func(rs *RelayServer) {
		if rs != nil && !rs.Self && !slices.Contains(peers, rs.ip) && !slices.Contains(out, rs) && len(out) < maxProbes {
			out = append(out, rs)
		}
	}
	if exp != nil {
		add(exp.server)
	}
	for _, rs := range servers {
		if rs.Advertising {
			add(rs)
		}
	}
	for _, rs := range servers {
		add(rs)
	}
	return out
}

// candidates are the relay servers that could carry traffic to the peer at
// ip: not this laptop, not the peer itself.
func candidates(servers []*RelayServer, ip netip.Addr) []*RelayServer {
	var out []*RelayServer
	for _, rs := range servers {
		if !rs.Self && rs.ip != ip {
			out = append(out, rs)
		}
	}
	return out
}

// whichRelay says which relay node owns the relay endpoint ep, or nil when
// this laptop cannot tell. The LocalAPI shows a relay path's address but
// not its server, and the path may go through a relay the peer chose, one
// this laptop does not even know; so being the only candidate proves
// nothing. The one evidence is the endpoint's IP among exactly one
// candidate's own endpoint addresses (a relay whose static endpoint is a
// load balancer's address is not identified this way: --relay ip:port
// checks the endpoint instead).
func whichRelay(cands []*RelayServer, ep netip.AddrPort) *RelayServer {
	var owners []*RelayServer
	for _, rs := range cands {
		if slices.Contains(rs.addrs, ep.Addr().Unmap()) {
			owners = append(owners, rs)
		}
	}
	if len(owners) == 1 {
		return owners[0]
	}
	return nil
}

// endpointAddrs returns the IPs of a node's own endpoints.
func endpointAddrs(p *ipnstate.PeerStatus) []netip.Addr {
	var out []netip.Addr
	for _, s := range append(slices.Clone(p.Addrs), p.CurAddr) {
		if ap, err := netip.ParseAddrPort(s); err == nil && !slices.Contains(out, ap.Addr().Unmap()) {
			out = append(out, ap.Addr().Unmap())
		}
	}
	return out
}

func labels(servers []*RelayServer) string {
	var s []string
	for _, rs := range servers {
		s = append(s, rs.label())
	}
	return strings.Join(s, ", ")
}
