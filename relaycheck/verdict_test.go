package relaycheck

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"tailscale.com/ipn/ipnstate"
	"tailscale.com/types/key"
)

// The test tailnet: this laptop, peer b, and relays r1 and r2.
var (
	ipSelf = netip.MustParseAddr("100.64.0.1")
	ipB    = netip.MustParseAddr("100.64.0.2")
	ipR1   = netip.MustParseAddr("100.64.0.3")
	ipR2   = netip.MustParseAddr("100.64.0.4")
)

func testStatus() *ipnstate.Status {
	peer := func(host string, ip netip.Addr) *ipnstate.PeerStatus {
		return &ipnstate.PeerStatus{HostName: host, DNSName: host + ".example.ts.net.", TailscaleIPs: []netip.Addr{ip}}
	}
	st := &ipnstate.Status{BackendState: "Running", Self: peer("laptop", ipSelf)}
	for _, p := range []*ipnstate.PeerStatus{peer("b", ipB), peer("r1", ipR1), peer("r2", ipR2)} {
		addPeer(st, p)
	}
	return st
}

func addPeer(st *ipnstate.Status, p *ipnstate.PeerStatus) {
	if st.Peer == nil {
		st.Peer = map[key.NodePublic]*ipnstate.PeerStatus{}
	}
	st.Peer[key.NewNode().Public()] = p
}

// server is a relay server entry; probe is "" (not probed), "up" or "down".
func server(name string, ip netip.Addr, advertising bool, probe string) *RelayServer {
	rs := &RelayServer{Name: name, IP: ip.String(), ip: ip, Advertising: advertising, Self: ip == ipSelf}
	switch probe {
	case "up":
		rs.Probe = &Probe{Answered: true}
	case "down":
		rs.Probe = &Probe{Unanswered: 3}
	}
	return rs
}

func TestVerdict(t *testing.T) {
	st := testStatus()
	self := server("laptop", ipSelf, false, "")
	r1 := func(adv bool, probe string) *RelayServer { return server("r1", ipR1, adv, probe) }
	r2 := server("r2", ipR2, true, "up")
	// owns gives rs relay57's endpoint address as one of its own: the
	// evidence that it carried relay57.
	owns := func(rs *RelayServer) *RelayServer {
		rs.addrs = []netip.Addr{relay57.endpoint.Addr()}
		return rs
	}
	expect := func(relay string, servers ...*RelayServer) *expectation {
		exp := resolveExpected(st, relay)
		if exp.node != nil {
			exp.grantKnown = true
			for _, rs := range servers {
				if rs.ip == exp.node.TailscaleIPs[0] {
					exp.server = rs
				}
			}
		}
		return exp
	}
	denied := errors.New("list peer relay servers: access denied")
	tests := []struct {
		name         string
		pongs        []path
		pingErr      string
		peerRelay    string
		requireRelay bool
		servers      []*RelayServer
		listErr      error
		exp          *expectation
		wantOK       bool
		wantCode     string
		wantIn       string // in the diagnosis message or note
		wantExpected string // "true", "false" or "" (unknown)
	}{
		{name: "relayed", pongs: []path{derpFra, relay57}, servers: []*RelayServer{self, owns(r1(true, ""))}, wantOK: true},
		{name: "relayed, not identified", pongs: []path{derpFra, relay57}, servers: []*RelayServer{self, r1(true, "")}, wantOK: true,
			wantIn: "through a peer relay at 203.0.113.7:61441, not identified"},
		{name: "relayed, expected by name", pongs: []path{relay57}, servers: []*RelayServer{owns(r1(true, ""))},
			exp: expect("r1", owns(r1(true, ""))), wantOK: true, wantExpected: "true"},
		// The only relay this laptop knows, advertising, is no proof:
		// the peer may have set the path up through a relay of its own.
		{name: "relayed, expected by name, not identified", pongs: []path{relay57}, servers: []*RelayServer{r1(true, "")},
			exp: expect("r1", r1(true, "")), wantOK: true,
			wantIn: "through a peer relay at 203.0.113.7:61441, not identified: this laptop cannot tell whether it is the expected r1"},
		{name: "relayed, expected by endpoint", pongs: []path{relay57}, servers: []*RelayServer{r1(true, "")},
			exp: expect("203.0.113.7:61441"), wantOK: true, wantExpected: "true"},
		{name: "relayed by another endpoint", pongs: []path{relay57}, servers: []*RelayServer{owns(r1(true, ""))},
			exp: expect("198.51.100.1:61441"), wantCode: CodeUnexpectedRelay, wantIn: "r1 at 203.0.113.7:61441", wantExpected: "false"},
		{name: "relayed by another relay", pongs: []path{relay57}, servers: []*RelayServer{r1(false, ""), owns(server("r2", ipR2, true, "up"))},
			exp: expect("r1", r1(false, "")), wantCode: CodeUnexpectedRelay, wantIn: "not the expected r1 (100.64.0.3)", wantExpected: "false"},
		{name: "relayed, cannot tell which", pongs: []path{relay57}, servers: []*RelayServer{owns(r1(true, "")), owns(server("r2", ipR2, true, "up"))},
			exp: expect("r1", r1(true, "")), wantOK: true, wantIn: "not identified"},
		{name: "relayed, expected relay unknown", pongs: []path{relay57}, servers: []*RelayServer{r1(true, "")},
			exp: expect("nosuch"), wantCode: CodeRelayNotFound, wantIn: `"nosuch"`, wantExpected: "false"},
		{name: "direct", pongs: []path{derpFra, relay57, direct}, wantOK: true},
		{name: "direct, relay required", pongs: []path{direct}, requireRelay: true, wantCode: CodeDirect},
		{name: "no answer", wantCode: CodeNoAnswer, wantIn: "offline"},
		{name: "no answer, stale relay path", peerRelay: "203.0.113.7:61441:vni:57", wantCode: CodeNoAnswer, wantIn: "gone away"},
		{name: "ping error", pingErr: "ping 100.64.0.2: no matching peer", wantCode: CodePingError, wantIn: "no matching peer"},
		{name: "DERP, no servers", pongs: []path{derpFra}, wantCode: CodeNoRelayServers, wantIn: `"tailscale.com/cap/relay"`},
		{name: "DERP, only self", pongs: []path{derpFra}, servers: []*RelayServer{self}, wantCode: CodeNoRelayServers, wantIn: "besides laptop"},
		{name: "DERP, no servers, expected", pongs: []path{derpFra}, exp: expect("r1"), wantCode: CodeNoRelayServers},
		{name: "DERP, expected not found", pongs: []path{derpFra}, servers: []*RelayServer{r1(true, "")},
			exp: expect("nosuch"), wantCode: CodeRelayNotFound},
		{name: "DERP, expected not granted", pongs: []path{derpFra}, servers: []*RelayServer{r2},
			exp: expect("r1", r2), wantCode: CodeRelayNotGranted, wantIn: "r1 (100.64.0.3)"},
		{name: "DERP, expected offline", pongs: []path{derpFra}, servers: []*RelayServer{r1(true, "down")},
			exp: expect("r1", r1(true, "down")), wantCode: CodeRelayOffline, wantIn: "none of 3 disco pings"},
		{name: "DERP, expected not advertising", pongs: []path{derpFra}, servers: []*RelayServer{r1(false, "up")},
			exp: expect("r1", r1(false, "up")), wantCode: CodeRelayNotAdvertising},
		{name: "DERP, expected unreachable", pongs: []path{derpFra}, servers: []*RelayServer{r1(true, "up")},
			exp: expect("100.64.0.3", r1(true, "up")), wantCode: CodeRelayUnreachable, wantIn: "UDP"},
		{name: "DERP, list denied", pongs: []path{derpFra}, listErr: denied, wantCode: CodeRelayServersUnknown, wantIn: "--relay"},
		{name: "DERP, only relay offline", pongs: []path{derpFra}, servers: []*RelayServer{self, r1(true, "down")},
			wantCode: CodeRelayOffline, wantIn: "r1 (100.64.0.3) is offline"},
		{name: "DERP, every relay offline", pongs: []path{derpFra}, servers: []*RelayServer{r1(true, "down"), server("r2", ipR2, true, "down")},
			wantCode: CodeRelayOffline, wantIn: "every peer relay server"},
		{name: "DERP, relay not advertising", pongs: []path{derpFra}, servers: []*RelayServer{r1(false, "up")},
			wantCode: CodeRelayNotAdvertising},
		{name: "DERP, relay unreachable", pongs: []path{derpFra}, servers: []*RelayServer{r1(false, "up"), r2},
			wantCode: CodeRelayUnreachable, wantIn: "r2 (100.64.0.4)"},
		{name: "back on DERP", pongs: []path{relay57, derpFra}, servers: []*RelayServer{r1(true, "down")}, wantCode: CodeRelayOffline},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			run := peerRun{err: tt.pingErr}
			for _, p := range tt.pongs {
				run.pongs = append(run.pongs, pong{path: p})
				run.pings++
			}
			tgt := target{arg: "b", ip: ipB, node: &ipnstate.PeerStatus{HostName: "b", TailscaleIPs: []netip.Addr{ipB}, PeerRelay: tt.peerRelay}}
			rep := peerReport(Options{RequireRelay: tt.requireRelay}, tgt, run, tt.exp, relayView{servers: tt.servers, listErr: tt.listErr})
			var code, text string
			if rep.Diagnosis != nil {
				code, text = rep.Diagnosis.Code, rep.Diagnosis.Message
			}
			text += rep.Note
			if rep.OK != tt.wantOK || code != tt.wantCode || !strings.Contains(text, tt.wantIn) {
				t.Errorf("ok %v, diagnosis %q %q, note %q; want ok %v, %q containing %q",
					rep.OK, code, rep.Diagnosis, rep.Note, tt.wantOK, tt.wantCode, tt.wantIn)
			}
			if rep.OK == (rep.Diagnosis != nil) {
				t.Errorf("ok %v with diagnosis %+v: want a diagnosis exactly when not ok", rep.OK, rep.Diagnosis)
			}
			expected := ""
			if rep.Relay != nil && rep.Relay.Expected != nil {
				expected = map[bool]string{true: "true", false: "false"}[*rep.Relay.Expected]
			}
			if expected != tt.wantExpected {
				t.Errorf("relay %+v: expected = %q, want %q", rep.Relay, expected, tt.wantExpected)
			}
		})
	}
}

func TestResolve(t *testing.T) {
	st := testStatus()
	dup := &ipnstate.PeerStatus{HostName: "b", DNSName: "b-1.example.ts.net.", TailscaleIPs: []netip.Addr{netip.MustParseAddr("100.64.0.9")}}
	tests := []struct {
		arg     string
		want    string // the IP, or a substring of the error
		wantErr bool
	}{
		{"b", "100.64.0.2", false},
		{"B", "100.64.0.2", false},
		{"b.example.ts.net", "100.64.0.2", false},
		{"b.example.ts.net.", "100.64.0.2", false},
		{"100.64.0.3", "100.64.0.3", false},
		{"10.1.2.3", "10.1.2.3", false}, // not a node: pinged as is (a subnet route, say)
		{"laptop", "this laptop", true},
		{"100.64.0.1", "own address", true},
		{"nosuch", "no node named", true},
		{"b-1", "100.64.0.9", false},
	}
	addPeer(st, dup)
	for _, tt := range tests {
		got, err := resolve(st, tt.arg)
		switch {
		case tt.wantErr && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("resolve(%q) = %v, %v; want an error containing %q", tt.arg, got.ip, err, tt.want)
		case !tt.wantErr && (err != nil || got.ip.String() != tt.want):
			t.Errorf("resolve(%q) = %v, %v; want %s", tt.arg, got.ip, err, tt.want)
		}
	}
	// Two nodes with one hostname and neither MagicDNS name matching it:
	// the hostname is ambiguous.
	addPeer(st, &ipnstate.PeerStatus{HostName: "x", DNSName: "x-1.example.ts.net.", TailscaleIPs: []netip.Addr{netip.MustParseAddr("100.64.0.10")}})
	addPeer(st, &ipnstate.PeerStatus{HostName: "x", DNSName: "x-2.example.ts.net.", TailscaleIPs: []netip.Addr{netip.MustParseAddr("100.64.0.11")}})
	if _, err := resolve(st, "x"); err == nil || !strings.Contains(err.Error(), "matches 2 nodes") {
		t.Errorf("resolve(ambiguous x) error = %v, want one saying it matches 2 nodes", err)
	}
}

func TestWhichRelay(t *testing.T) {
	ep := relay57.endpoint
	with := func(rs *RelayServer, addrs ...string) *RelayServer {
		for _, a := range addrs {
			rs.addrs = append(rs.addrs, netip.MustParseAddr(a))
		}
		return rs
	}
	r1 := with(server("r1", ipR1, false, ""), "10.0.0.1")
	r1owns := with(server("r1", ipR1, true, ""), "10.0.0.1", ep.Addr().String())
	r2 := with(server("r2", ipR2, true, ""), "10.0.0.2")
	r2owns := with(server("r2", ipR2, true, ""), ep.Addr().String())
	tests := []struct {
		name  string
		cands []*RelayServer
		want  *RelayServer
	}{
		{"none", nil, nil},
		// Being the only (advertising) candidate proves nothing: the
		// peer may use a relay this laptop does not know.
		{"one, not its address", []*RelayServer{r1}, nil},
		{"one advertising of two, neither its address", []*RelayServer{r1, r2}, nil},
		{"its address", []*RelayServer{r1owns}, r1owns},
		{"its address, one of two", []*RelayServer{r1owns, r2}, r1owns},
		{"two with the address", []*RelayServer{r1owns, r2owns}, nil},
	}
	for _, tt := range tests {
		if got := whichRelay(tt.cands, ep); got != tt.want {
			t.Errorf("%s: whichRelay = %+v, want %+v", tt.name, got, tt.want)
		}
	}
}
