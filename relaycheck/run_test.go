package relaycheck

import (
	"context"
	"errors"
	"flag"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
)

// fakeAPI is a scripted tailscaled LocalAPI.
type fakeAPI struct {
	status *ipnstate.Status
	// pings are the results each IP gives in turn, the last one repeating;
	// a nil result is a ping that is never answered.
	pings      map[netip.Addr][]*ipnstate.PingResult
	relays     []any // the peer-relay-servers answer
	relaysErr  error
	peerRelay  map[netip.Addr]bool               // Hostinfo.PeerRelay by node
	capMap     map[netip.Addr]tailcfg.PeerCapMap // WhoIs CapMap by node
	mu         sync.Mutex
	pingsSent  map[netip.Addr]int
	whoisCalls int
	// derpMap is the laptop's DERP map.
	derpMap *tailcfg.DERPMap
}

func (f *fakeAPI) Status(context.Context) (*ipnstate.Status, error) { return f.status, nil }

func (f *fakeAPI) CurrentDERPMap(context.Context) (*tailcfg.DERPMap, error) {
	if f.derpMap == nil {
		return &tailcfg.DERPMap{}, nil
	}
	return f.derpMap, nil
}

func (f *fakeAPI) Ping(ctx context.Context, ip netip.Addr, _ tailcfg.PingType) (*ipnstate.PingResult, error) {
	f.mu.Lock()
	script := f.pings[ip]
	n := f.pingsSent[ip]
	f.pingsSent[ip]++
	f.mu.Unlock()
	if len(script) == 0 {
		return &ipnstate.PingResult{Err: "no matching peer"}, nil
	}
	pr := script[min(n, len(script)-1)]
	if pr == nil {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return pr, nil
}

func (f *fakeAPI) WhoIs(_ context.Context, addr string) (*apitype.WhoIsResponse, error) {
	f.mu.Lock()
	f.whoisCalls++
	f.mu.Unlock()
	ip := netip.MustParseAddr(addr)
	hi := &tailcfg.Hostinfo{PeerRelay: f.peerRelay[ip]}
	return &apitype.WhoIsResponse{Node: &tailcfg.Node{Hostinfo: hi.View()}, CapMap: f.capMap[ip]}, nil
}

func (f *fakeAPI) DebugResultJSON(_ context.Context, action string) (any, error) {
	if action != "peer-relay-servers" {
		return nil, errors.New("unexpected debug action " + action)
	}
	return f.relays, f.relaysErr
}

var (
	pongDERP  = &ipnstate.PingResult{DERPRegionID: 1, DERPRegionCode: "fra", LatencySeconds: 0.030}
	pongRelay = &ipnstate.PingResult{PeerRelay: "203.0.113.7:61441:vni:57", LatencySeconds: 0.002}
)

func newFake() *fakeAPI {
	return &fakeAPI{
		status:    testStatus(),
		pings:     map[netip.Addr][]*ipnstate.PingResult{},
		peerRelay: map[netip.Addr]bool{ipR1: true},
		pingsSent: map[netip.Addr]int{},
		relays:    []any{ipSelf.String(), ipB.String(), ipR1.String()},
	}
}

// fastOptions make a check that fits a unit test.
func fastOptions(peers ...string) Options {
	return Options{Peers: peers, Timeout: time.Second, Interval: time.Millisecond, pingTimeout: 50 * time.Millisecond}
}

// setAddrs gives the node at ip its own endpoint addresses.
func setAddrs(st *ipnstate.Status, ip netip.Addr, addrs ...string) {
	for _, p := range st.Peer {
		if slices.Contains(p.TailscaleIPs, ip) {
			p.Addrs = addrs
		}
	}
}

func TestRunRelayed(t *testing.T) {
	f := newFake()
	// r1's own address is the relay endpoint's: that is how the check
	// knows r1 carried the path.
	setAddrs(f.status, ipR1, "203.0.113.7:41641", "10.0.0.5:41641")
	f.pings[ipB] = []*ipnstate.PingResult{pongDERP, pongDERP, pongRelay}
	f.pings[ipR1] = []*ipnstate.PingResult{pongDERP}
	opts := fastOptions("b")
	opts.Relay = "r1"
	rep, err := Run(t.Context(), f, opts)
	if err != nil {
		t.Fatal(err)
	}
	p := rep.Peers[0]
	if !rep.OK || p.Via != ViaPeerRelay || p.Relay.Name != "r1" || p.Relay.Expected == nil || !*p.Relay.Expected {
		t.Errorf("report %+v, peer %+v, relay %+v; want OK through r1, as expected", rep, p, p.Relay)
	}
	// Settled after three relayed pongs: five pings in all.
	if p.Pings != 5 || len(p.Path) != 2 || p.Path[1].Pongs != stablePongs {
		t.Errorf("pings %d, path %+v; want 5 pings, 2 DERP pongs then %d relayed", p.Pings, p.Path, stablePongs)
	}
	var text strings.Builder
	if err := WriteText(&text, rep); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"b (100.64.0.2): OK via peer-relay 203.0.113.7:61441 vni 57 (r1, as expected)",
		"path: DERP(fra) ×2 min 30ms median 30ms → peer-relay(203.0.113.7:61441 vni 57) ×3 min 2.0ms median 2.0ms",
		"5 pongs to 5 pings",
	} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text report does not contain %q:\n%s", want, text.String())
		}
	}
}

// TestRunRelayedNotIdentified: the path goes through a relay endpoint none
// of whose addresses this laptop can tie to a node; r1 is the only relay
// this laptop knows and advertises, but the peer may have used a relay of
// its own, so the path must not be credited to r1: relayed, yes (exit 0),
// by r1, unknown.
func TestRunRelayedNotIdentified(t *testing.T) {
	f := newFake()
	setAddrs(f.status, ipR1, "198.51.100.9:41641")
	f.pings[ipB] = []*ipnstate.PingResult{pongDERP, pongDERP, pongRelay}
	f.pings[ipR1] = []*ipnstate.PingResult{pongDERP}
	opts := fastOptions("b")
	opts.Relay = "r1"
	rep, err := Run(t.Context(), f, opts)
	if err != nil {
		t.Fatal(err)
	}
	p := rep.Peers[0]
	if !rep.OK || p.Relay == nil || p.Relay.Name != "" || p.Relay.IP != "" || p.Relay.Expected != nil {
		t.Errorf("ok %v, relay %+v, diagnosis %+v; want relayed, with no relay credited and nothing said expected", rep.OK, p.Relay, p.Diagnosis)
	}
	var text strings.Builder
	if err := WriteText(&text, rep); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"b (100.64.0.2): OK via peer-relay 203.0.113.7:61441 vni 57 (not identified)",
		"through a peer relay at 203.0.113.7:61441, not identified: this laptop cannot tell whether it is the expected r1 (100.64.0.3)",
	} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text report does not contain %q:\n%s", want, text.String())
		}
	}
}

func TestRunRelayOffline(t *testing.T) {
	f := newFake()
	f.pings[ipB] = []*ipnstate.PingResult{pongDERP}
	f.pings[ipR1] = []*ipnstate.PingResult{nil}
	rep, err := Run(t.Context(), f, fastOptions("b"))
	if err != nil {
		t.Fatal(err)
	}
	p := rep.Peers[0]
	if rep.OK || p.Via != ViaDERP || p.Diagnosis == nil || p.Diagnosis.Code != CodeRelayOffline {
		t.Errorf("peer %+v, diagnosis %+v; want DERP only, %s", p, p.Diagnosis, CodeRelayOffline)
	}
}

// Without LocalAPI write access the list of relay servers is denied;
// WhoIs still says whether the expected relay is one.
func TestRunDebugDenied(t *testing.T) {
	for _, tt := range []struct {
		relay    string
		capMap   tailcfg.PeerCapMap
		wantCode string
	}{
		{"", nil, CodeRelayServersUnknown},
		{"r1", tailcfg.PeerCapMap{tailcfg.PeerCapabilityRelayTarget: nil}, CodeRelayUnreachable},
		{"r1", nil, CodeRelayNotGranted},
	} {
		f := newFake()
		f.relays, f.relaysErr = nil, &local.AccessDeniedError{}
		f.capMap = map[netip.Addr]tailcfg.PeerCapMap{ipR1: tt.capMap}
		f.pings[ipB] = []*ipnstate.PingResult{pongDERP}
		f.pings[ipR1] = []*ipnstate.PingResult{pongDERP}
		opts := fastOptions("b")
		opts.Relay = tt.relay
		opts.Timeout = 200 * time.Millisecond
		rep, err := Run(t.Context(), f, opts)
		if err != nil {
			t.Fatal(err)
		}
		if d := rep.Peers[0].Diagnosis; d == nil || d.Code != tt.wantCode || !strings.Contains(rep.RelayServersError, "operator") {
			t.Errorf("--relay=%q, caps %v: diagnosis %+v, relayServersError %q; want %s and a hint at the operator",
				tt.relay, tt.capMap, d, rep.RelayServersError, tt.wantCode)
		}
	}
}

func TestRunSeveralPeers(t *testing.T) {
	f := newFake()
	f.pings[ipB] = []*ipnstate.PingResult{pongRelay}
	f.pings[ipR1] = []*ipnstate.PingResult{pongDERP}
	start := time.Now()
	rep, err := Run(t.Context(), f, fastOptions("b", "nosuch", "r2"))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range rep.Peers {
		code := ""
		if p.Diagnosis != nil {
			code = p.Diagnosis.Code
		}
		got = append(got, p.Peer+":"+p.Via+":"+code)
	}
	want := []string{"b:peer-relay:", "nosuch:none:ping-error", "r2:none:ping-error"}
	if rep.OK || !reflect.DeepEqual(got, want) {
		t.Errorf("peers = %q (ok %v), want %q and not ok", got, rep.OK, want)
	}
	// Nothing needed a diagnosis from probes, so nothing waited for them.
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("check took %v; want it to end once the peers are done", d)
	}
}

func TestRunNotRunning(t *testing.T) {
	f := newFake()
	f.status.BackendState = "NeedsLogin"
	if _, err := Run(t.Context(), f, fastOptions("b")); err == nil || !strings.Contains(err.Error(), "NeedsLogin") {
		t.Errorf("Run while logged out = %v, want an error naming NeedsLogin", err)
	}
}

func TestParseArgs(t *testing.T) {
	tests := []struct {
		args     []string
		want     Options
		wantJSON bool
		wantErr  string
	}{
		{args: []string{"b"}, want: Options{Peers: []string{"b"}, Timeout: 10 * time.Second, Interval: 250 * time.Millisecond}},
		{
			args:     []string{"--json", "b", "--relay=r1", "c", "--require-relay", "--timeout=5s", "--count=4"},
			want:     Options{Peers: []string{"b", "c"}, Relay: "r1", RequireRelay: true, Timeout: 5 * time.Second, Interval: 250 * time.Millisecond, Count: 4},
			wantJSON: true,
		},
		{args: nil, wantErr: "no peer"},
		{args: []string{"--json"}, wantErr: "no peer"},
		{args: []string{"b", "b"}, wantErr: "twice"},
		{args: []string{"--timeout=0s", "b"}, wantErr: "--timeout"},
		{args: []string{"--count=-1", "b"}, wantErr: "--count"},
		{args: []string{"--bogus", "b"}, wantErr: "bogus"},
	}
	for _, tt := range tests {
		opts, _, asJSON, err := parseArgs(tt.args)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseArgs(%q) error = %v, want one containing %q", tt.args, err, tt.wantErr)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(opts, tt.want) || asJSON != tt.wantJSON {
			t.Errorf("parseArgs(%q) = %+v, json %v, %v; want %+v, json %v", tt.args, opts, asJSON, err, tt.want, tt.wantJSON)
		}
	}
	if _, _, _, err := parseArgs([]string{"--help"}); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("parseArgs(--help) = %v, want flag.ErrHelp", err)
	}
}

func TestMainExitCodes(t *testing.T) {
	noDaemon := "--socket=" + filepath.Join(t.TempDir(), "no.sock")
	tests := []struct {
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{[]string{"--help"}, 0, "Usage: relay check", ""},
		{nil, 2, "", "no peer to check"},
		{[]string{"--timeout=x", "b"}, 2, "", "invalid value"},
		{[]string{noDaemon, "b"}, 1, "", "relay check: ask tailscaled for its status"},
	}
	for _, tt := range tests {
		var stdout, stderr strings.Builder
		code := Main(t.Context(), tt.args, &stdout, &stderr)
		if code != tt.wantCode || !strings.Contains(stdout.String(), tt.wantStdout) || !strings.Contains(stderr.String(), tt.wantStderr) {
			t.Errorf("Main(%q) = %d, stdout %q, stderr %q; want %d, %q, %q",
				tt.args, code, stdout.String(), stderr.String(), tt.wantCode, tt.wantStdout, tt.wantStderr)
		}
	}
}
