// Package relaycheck is `relay check`: run on a laptop, it asks the laptop's
// own tailscaled (through its LocalAPI) whether traffic to some peers rides
// a peer relay, and if not, why.
//
// For each peer it sends disco pings, as `tailscale ping` does, for a bounded
// time, and reports the sequence of paths the pongs came back on (DERP, then
// a peer relay, perhaps later a direct path) with the latency on each, which
// relay carried the traffic, and whether that is the expected one. When the
// pongs never left DERP it says why: no peer relay server is known to the
// laptop (the tailnet policy grants no "tailscale.com/cap/relay"), the
// expected relay is not a relay server for this laptop, it is offline (it
// does not answer disco pings itself), it does not advertise a relay server,
// or it is known and online but unreachable (UDP to its relay endpoints
// blocked).
//
// # JSON report
//
// `relay check --json` prints one object. Fields are only ever added;
// those shown empty are omitted when empty.
//
//	{
//	  "ok": true,                     // every peer met the requirement
//	  "expectedRelay": "relay",       // --relay as given, if any
//	  "peers": [{
//	    "peer": "b",                  // as given on the command line
//	    "name": "b",                  // its hostname, if it is a node in the netmap
//	    "dnsName": "b.tailnet.ts.net",
//	    "ip": "100.64.0.2",           // the address pinged
//	    "ok": true,
//	    "via": "peer-relay",          // the path of the last pong: "peer-relay", "direct", "derp" or "none"
//	    "relay": {                    // when via is "peer-relay"
//	      "endpoint": "203.0.113.7:61441", "vni": 57,
//	      "name": "relay", "ip": "100.64.0.1", // the relay node, when it can be told
//	      "expected": true            // with --relay: whether it is the expected one (absent if unknown)
//	    },
//	    "path": [                     // consecutive pongs on one path make one segment
//	      {"kind": "derp", "derpRegion": "fra", "pongs": 2, "minMs": 30.1, "medianMs": 31.4, "firstMs": 35.2},
//	      {"kind": "peer-relay", "endpoint": "203.0.113.7:61441", "vni": 57, "pongs": 3, "minMs": 1.1, "medianMs": 1.6, "firstMs": 1210.4}
//	    ],
//	    "firstRelayedOrDirectMs": 1210.4, // since the check started; absent if none
//	    "pings": 5, "pongs": 5, "timeouts": 0,
//	    "error": "",                  // a ping that failed outright (unknown peer, …)
//	    "note": "",                   // something worth knowing that does not fail the check
//	    "diagnosis": {"code": "relay-offline", "message": "…"} // when ok is false
//	  }],
//	  "relayServers": [{              // peer relay servers this laptop knows
//	    "name": "relay", "dnsName": "relay.tailnet.ts.net", "ip": "100.64.0.1",
//	    "advertising": true,          // its node info says it runs a relay server
//	    "self": false,                // this laptop itself
//	    "probe": {"answered": true, "via": "DERP(fra)", "latencyMs": 31.2, "unanswered": 0}
//	  }],
//	  "relayServersError": ""         // why the list could not be read (needs root or the operator)
//	}
//
// Diagnosis codes: no-answer, ping-error, no-relay-servers,
// relay-servers-unknown, relay-not-found, relay-not-granted, relay-offline,
// relay-not-advertising, relay-unreachable, unexpected-relay, direct.
package relaycheck

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
)

const (
	// pingTimeout bounds one disco ping. A pong through DERP takes well
	// under a second; a ping sent only to a dead relay path (magicsock
	// trusts a path for 6.5 s after its last pong) never gets one, and the
	// next ping, once the path is no longer trusted, goes via DERP too.
	pingTimeout = 2 * time.Second
	// stablePongs relayed or direct pongs in a row end a peer's check early
	// (without --count): the path has settled.
	stablePongs = 3
	// maxProbes bounds how many relay nodes are pinged to tell offline
	// relays from unreachable ones.
	maxProbes = 8
	// maxWhoIs bounds the LocalAPI WhoIs calls that learn which relay
	// servers advertise a relay, for policies that grant every node.
	maxWhoIs = 64
)

// LocalAPI is the part of tailscaled's LocalAPI a check uses.
// *local.Client implements it.
type LocalAPI interface {
	Status(ctx context.Context) (*ipnstate.Status, error)
	Ping(ctx context.Context, ip netip.Addr, pingtype tailcfg.PingType) (*ipnstate.PingResult, error)
	WhoIs(ctx context.Context, remoteAddr string) (*apitype.WhoIsResponse, error)
	DebugResultJSON(ctx context.Context, action string) (any, error)
	CurrentDERPMap(ctx context.Context) (*tailcfg.DERPMap, error)
}

// Options configure a check.
type Options struct {
	// Peers to check: hostnames, MagicDNS names or tailnet IPs.
	Peers []string
	// Relay is the expected relay: a hostname, MagicDNS name or tailnet IP
	// of the relay node, or the ip:port of its relay endpoint. Empty
	// accepts any relay.
	Relay string
	// RequireRelay fails a peer reached directly.
	RequireRelay bool
	// Timeout bounds the whole check, all peers together.
	Timeout time.Duration
	// Interval is the time between the starts of two pings to one peer.
	Interval time.Duration
	// Count, if positive, is how many pings each peer gets; otherwise a
	// peer's check ends once stablePongs pongs in a row came relayed or
	// direct.
	Count int

	pingTimeout time.Duration // for tests; zero means pingTimeout
}

// Report is the outcome of a check, as `--json` prints it.
type Report struct {
	OK                bool           `json:"ok"`
	ExpectedRelay     string         `json:"expectedRelay,omitempty"`
	Peers             []PeerReport   `json:"peers"`
	RelayServers      []*RelayServer `json:"relayServers"`
	RelayServersError string         `json:"relayServersError,omitempty"`
}

// PeerReport is the outcome for one peer.
type PeerReport struct {
	Peer                   string     `json:"peer"`
	Name                   string     `json:"name,omitempty"`
	DNSName                string     `json:"dnsName,omitempty"`
	IP                     string     `json:"ip,omitempty"`
	OK                     bool       `json:"ok"`
	Via                    string     `json:"via"`
	Relay                  *RelayUse  `json:"relay,omitempty"`
	Path                   []Segment  `json:"path"`
	FirstRelayedOrDirectMs *float64   `json:"firstRelayedOrDirectMs,omitempty"`
	Pings                  int        `json:"pings"`
	Pongs                  int        `json:"pongs"`
	Timeouts               int        `json:"timeouts"`
	Error                  string     `json:"error,omitempty"`
	Note                   string     `json:"note,omitempty"`
	Diagnosis              *Diagnosis `json:"diagnosis,omitempty"`
	// Home is the peer's home DERP region (its first packets' path), and
	// for a tsrelay's in-cluster region whether this laptop reaches it.
	Home *HomeRegion `json:"home,omitempty"`
}

// RelayUse says which relay carried a peer's traffic.
type RelayUse struct {
	Endpoint string `json:"endpoint"`
	VNI      uint32 `json:"vni"`
	Name     string `json:"name,omitempty"`
	IP       string `json:"ip,omitempty"`
	Expected *bool  `json:"expected,omitempty"`
}

// Diagnosis says why a peer failed the check.
type Diagnosis struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// target is a peer to ping.
type target struct {
	arg  string
	ip   netip.Addr
	node *ipnstate.PeerStatus // nil if ip is not a node's address (a subnet route, say)
}

// Run checks opts.Peers through lc. It returns an error only when the check
// cannot run at all (tailscaled unreachable or not running); a peer that
// cannot be resolved or pinged fails in the report.
func Run(ctx context.Context, lc LocalAPI, opts Options) (*Report, error) {
	start := time.Now()
	if opts.pingTimeout == 0 {
		opts.pingTimeout = pingTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	st, err := lc.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("ask tailscaled for its status: %w", err)
	}
	if st.BackendState != ipn.Running.String() {
		return nil, fmt.Errorf("tailscaled is %s, not Running: run `tailscale up` first", st.BackendState)
	}

	exp := resolveExpected(st, opts.Relay)
	relays := gatherRelays(ctx, lc, st, exp)
	rep := &Report{ExpectedRelay: opts.Relay, RelayServers: relays.servers}
	if rep.RelayServers == nil {
		rep.RelayServers = []*RelayServer{} // [] rather than null in JSON
	}
	if relays.listErr != nil {
		rep.RelayServersError = relays.listErr.Error()
	}

	targets, runs := resolveAll(st, opts.Peers)
	var targetIPs []netip.Addr
	for _, t := range targets {
		if t.ip.IsValid() {
			targetIPs = append(targetIPs, t.ip)
		}
	}

	// Probe relay nodes while the peers are pinged: only a failing peer
	// needs the answer, and then there is no time left to start.
	probeCtx, stopProbes := context.WithCancel(ctx)
	defer stopProbes()
	var probes sync.WaitGroup
	for _, rs := range toProbe(relays.servers, exp, targetIPs) {
		probes.Go(func() { rs.Probe = probe(probeCtx, lc, rs.ip, opts.pingTimeout) })
	}
	var peers sync.WaitGroup
	for i, t := range targets {
		if t.ip.IsValid() {
			peers.Go(func() { runs[i] = pingPeer(ctx, lc, t.ip, opts, start) })
		}
	}
	// Home regions while the pings run: DERP checks take a second or two.
	var homes map[string]*HomeRegion
	peers.Go(func() {
		var codes []string
		for _, t := range targets {
			if t.node != nil {
				codes = append(codes, t.node.Relay)
			}
		}
		homes = homeRegions(ctx, lc, codes)
	})
	peers.Wait()
	confirmAdmission(homes, runs)
	if !slices.ContainsFunc(runs, func(r peerRun) bool { return len(r.pongs) > 0 && r.last().kind == ViaDERP }) {
		stopProbes()
	}
	probes.Wait()

	rep.OK = true
	rep.Peers = make([]PeerReport, len(opts.Peers))
	for i := range opts.Peers {
		rep.Peers[i] = peerReport(opts, targets[i], runs[i], exp, relays)
		rep.Peers[i].Peer = opts.Peers[i]
		if t := targets[i]; t.node != nil {
			rep.Peers[i].Home = homes[t.node.Relay]
		}
		rep.OK = rep.OK && rep.Peers[i].OK
	}
	return rep, nil
}

// resolveAll resolves every peer; a peer that does not resolve has a zero
// target and a run that failed with the reason.
func resolveAll(st *ipnstate.Status, peers []string) ([]target, []peerRun) {
	targets := make([]target, len(peers))
	runs := make([]peerRun, len(peers))
	for i, arg := range peers {
		t, err := resolve(st, arg)
		if err != nil {
			runs[i].err = err.Error()
			continue
		}
		targets[i] = t
	}
	return targets, runs
}

// peerRun is what pinging one peer saw.
type peerRun struct {
	pongs           []pong
	pings, timeouts int
	err             string // why pinging stopped early, if it failed
}

func (r peerRun) last() path {
	if len(r.pongs) == 0 {
		return path{kind: ViaNone}
	}
	return r.pongs[len(r.pongs)-1].path
}

// pingPeer disco-pings ip every opts.Interval until ctx ends, opts.Count
// pings were sent, or (without a count) the path has settled off DERP.
func pingPeer(ctx context.Context, lc LocalAPI, ip netip.Addr, opts Options, start time.Time) peerRun {
	var r peerRun
	settled := 0
	pingLoop(ctx, lc, ip, opts.pingTimeout, opts.Interval, opts.Count, func(pr *ipnstate.PingResult, timedOut bool, err error) bool {
		r.pings++
		switch {
		case timedOut:
			r.timeouts++
		case err != nil:
			r.err = fmt.Sprintf("ping %s: %v", ip, err)
			return false
		default:
			p, err := pathOf(pr)
			if err != nil {
				r.err = fmt.Sprintf("ping %s: %v", ip, err)
				return false
			}
			latency := time.Duration(pr.LatencySeconds * float64(time.Second))
			r.pongs = append(r.pongs, pong{path: p, latency: latency, at: time.Since(start)})
			if p.kind == ViaDERP {
				settled = 0
			} else if settled++; opts.Count <= 0 && settled >= stablePongs {
				return false
			}
		}
		return true
	})
	return r
}

// pingLoop disco-pings ip, each ping bounded by timeout and started
// interval after the one before (at once if that one took longer), until
// ctx ends, count pings were sent (no bound if count <= 0), or handle
// returns false. handle gets each ping's outcome: timedOut when it went
// unanswered within timeout, err when it failed outright (a LocalAPI error
// or the ping result's Err), and otherwise the pong in pr. A ping cut short
// because ctx ended is not handed over: the check's time was up.
func pingLoop(ctx context.Context, lc LocalAPI, ip netip.Addr, timeout, interval time.Duration, count int,
	handle func(pr *ipnstate.PingResult, timedOut bool, err error) bool) {
	for sent := 0; count <= 0 || sent < count; sent++ {
		start := time.Now()
		pctx, cancel := context.WithTimeout(ctx, timeout)
		pr, err := lc.Ping(pctx, ip, tailcfg.PingDisco)
		timedOut := err != nil && pctx.Err() != nil
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil && pr.Err != "" {
			err = errors.New(pr.Err)
		}
		if !handle(pr, timedOut, err) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(start.Add(interval))):
		}
	}
}

// resolve finds the peer arg names: a tailnet IP (any IP is pinged as is),
// a hostname or a MagicDNS name, full or first label, in any case.
func resolve(st *ipnstate.Status, arg string) (target, error) {
	if ip, err := netip.ParseAddr(arg); err == nil {
		if st.Self != nil && slices.Contains(st.Self.TailscaleIPs, ip) {
			return target{}, fmt.Errorf("%s is this laptop's own address", arg)
		}
		for _, p := range st.Peer {
			if slices.Contains(p.TailscaleIPs, ip) {
				return target{arg: arg, ip: ip, node: p}, nil
			}
		}
		return target{arg: arg, ip: ip}, nil
	}
	if st.Self != nil && nameMatches(st.Self, arg) {
		return target{}, fmt.Errorf("%q is this laptop", arg)
	}
	// A MagicDNS name is unique, a hostname need not be: "b" is the node
	// whose MagicDNS name is b.<tailnet>, if any, before one whose
	// hostname is b (and whose MagicDNS name may be b-1.<tailnet>).
	var byDNS, byHost []*ipnstate.PeerStatus
	for _, p := range st.Peer {
		if dnsMatches(p, arg) {
			byDNS = append(byDNS, p)
		} else if strings.EqualFold(p.HostName, arg) {
			byHost = append(byHost, p)
		}
	}
	found := byDNS
	if len(found) == 0 {
		found = byHost
	}
	switch len(found) {
	case 0:
		return target{}, fmt.Errorf("no node named %q in this laptop's netmap", arg)
	case 1:
		if len(found[0].TailscaleIPs) == 0 {
			return target{}, fmt.Errorf("node %q has no tailnet address", arg)
		}
		return target{arg: arg, ip: found[0].TailscaleIPs[0], node: found[0]}, nil
	}
	var names []string
	for _, p := range found {
		names = append(names, dnsName(p))
	}
	slices.Sort(names)
	return target{}, fmt.Errorf("%q matches %d nodes (%s): use the full MagicDNS name or an IP", arg, len(found), strings.Join(names, ", "))
}

func nameMatches(p *ipnstate.PeerStatus, name string) bool {
	return dnsMatches(p, name) || strings.EqualFold(p.HostName, name)
}

// dnsMatches reports whether name is p's MagicDNS name, in full (with or
// without the final dot) or its first label.
func dnsMatches(p *ipnstate.PeerStatus, name string) bool {
	name = strings.TrimSuffix(name, ".")
	fqdn := dnsName(p)
	label, _, _ := strings.Cut(fqdn, ".")
	return fqdn != "" && (strings.EqualFold(name, fqdn) || strings.EqualFold(name, label))
}

// dnsName is p's MagicDNS name without the trailing dot.
func dnsName(p *ipnstate.PeerStatus) string { return strings.TrimSuffix(p.DNSName, ".") }

// probe disco-pings a relay node itself until it answers or ctx ends. A
// node that lets whole pings go unanswered is offline: even through DERP,
// any running node answers.
func probe(ctx context.Context, lc LocalAPI, ip netip.Addr, timeout time.Duration) *Probe {
	p := &Probe{}
	pingLoop(ctx, lc, ip, timeout, 0, 0, func(pr *ipnstate.PingResult, timedOut bool, err error) bool {
		switch {
		case timedOut:
			p.Unanswered++
			return true
		case err != nil:
			p.Error = err.Error()
		default:
			p.Answered = true
			if path, err := pathOf(pr); err == nil {
				p.Via = path.String()
			}
			p.LatencyMs = ms(time.Duration(pr.LatencySeconds * float64(time.Second)))
		}
		return false
	})
	return p
}
