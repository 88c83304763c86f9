package relaycheck

import (
	"fmt"
	"net/netip"
	"slices"
)

// Diagnosis codes, as in the JSON report.
const (
	CodeNoAnswer            = "no-answer"
	CodePingError           = "ping-error"
	CodeNoRelayServers      = "no-relay-servers"
	CodeRelayServersUnknown = "relay-servers-unknown"
	CodeRelayNotFound       = "relay-not-found"
	CodeRelayNotGranted     = "relay-not-granted"
	CodeRelayOffline        = "relay-offline"
	CodeRelayNotAdvertising = "relay-not-advertising"
	CodeRelayUnreachable    = "relay-unreachable"
	CodeUnexpectedRelay     = "unexpected-relay"
	CodeDirect              = "direct"
)

// grantHelp points at the fix for a missing relay grant.
const grantHelp = `the tailnet policy grants it no "tailscale.com/cap/relay" (see the tsrelay README, "The tailnet policy grant")`

// peerReport turns what pinging one peer saw into its report and verdict.
func peerReport(opts Options, t target, r peerRun, exp *expectation, relays relayView) PeerReport {
	rep := PeerReport{
		Pings:    r.pings,
		Pongs:    len(r.pongs),
		Timeouts: r.timeouts,
		Error:    r.err,
		Path:     summarise(r.pongs),
		Via:      r.last().kind,
	}
	if rep.Path == nil {
		rep.Path = []Segment{}
	}
	if t.ip.IsValid() {
		rep.IP = t.ip.String()
	}
	if t.node != nil {
		rep.Name, rep.DNSName = t.node.HostName, dnsName(t.node)
	}
	for _, p := range r.pongs {
		if p.path.kind != ViaDERP {
			at := ms(p.at)
			rep.FirstRelayedOrDirectMs = &at
			break
		}
	}
	in := verdictInput{
		run:          r,
		requireRelay: opts.RequireRelay,
		exp:          exp,
		servers:      relays.servers,
		cands:        candidates(relays.servers, t.ip),
		listErr:      relays.listErr,
	}
	if t.node != nil {
		in.peerRelay = t.node.PeerRelay
	}
	if last := r.last(); last.kind == ViaPeerRelay {
		rep.Relay = relayUse(last, in.cands, exp)
		in.relay = rep.Relay
	}
	rep.OK, rep.Diagnosis, rep.Note = verdict(in)
	return rep
}

// relayUse says which relay carried a relayed path and whether that was
// the expected one.
func relayUse(p path, cands []*RelayServer, exp *expectation) *RelayUse {
	u := &RelayUse{Endpoint: p.endpoint.String(), VNI: p.vni}
	rs := whichRelay(cands, p.endpoint)
	if rs != nil {
		u.Name, u.IP = rs.Name, rs.IP
	}
	switch {
	case exp == nil:
	case exp.endpoint.IsValid():
		u.Expected = new(sameAddrPort(p.endpoint, exp.endpoint))
	case exp.notFound:
		u.Expected = new(false)
	case rs != nil:
		u.Expected = new(slices.Contains(exp.node.TailscaleIPs, rs.ip))
	}
	return u
}

func sameAddrPort(a, b netip.AddrPort) bool {
	return a.Addr().Unmap() == b.Addr().Unmap() && a.Port() == b.Port()
}

// verdictInput is what the verdict on one peer depends on.
type verdictInput struct {
	run          peerRun
	relay        *RelayUse // the relay that carried the last pong, if one did
	requireRelay bool
	exp          *expectation
	servers      []*RelayServer // every relay server this laptop knows
	cands        []*RelayServer // those that could relay to this peer
	listErr      error
	peerRelay    string // the peer's relay path ("ip:port:vni:N") when the check started, if any
}

// verdict decides whether a peer passed, and if not, why. note is for
// something worth saying that does not fail the check.
func verdict(in verdictInput) (ok bool, d *Diagnosis, note string) {
	last := in.run.last()
	switch {
	case last.kind == ViaNone && in.run.err != "":
		return false, &Diagnosis{CodePingError, in.run.err}, ""
	case last.kind == ViaNone && in.peerRelay != "":
		return false, &Diagnosis{CodeNoAnswer, fmt.Sprintf(
			"no answer to %d disco pings; when the check started, this laptop's path to the peer went through the peer relay at %s, "+
				"which seems to have gone away: tailscaled falls back to DERP within about 10 s, so check again",
			in.run.pings, in.peerRelay)}, ""
	case last.kind == ViaNone:
		return false, &Diagnosis{CodeNoAnswer, fmt.Sprintf(
			"no answer to %d disco pings: the peer is offline, or unreachable even through DERP", in.run.pings)}, ""
	case last.kind == ViaDirect && in.requireRelay:
		return false, &Diagnosis{CodeDirect, fmt.Sprintf(
			"reached directly (%s), not through a peer relay, and --require-relay is set", last.endpoint)}, ""
	case last.kind == ViaDirect:
		if in.exp != nil {
			note = "reached directly, which beats any relay; --require-relay fails this"
		}
		return true, nil, note
	case last.kind == ViaPeerRelay:
		return relayedVerdict(in)
	}
	return false, diagnoseDERP(in), ""
}

// relayedVerdict judges a peer whose last pong came through a relay.
func relayedVerdict(in verdictInput) (bool, *Diagnosis, string) {
	exp, u := in.exp, in.relay
	switch {
	case exp == nil && u.Name == "" && u.IP == "":
		return true, nil, notIdentified(u)
	case exp == nil:
		return true, nil, ""
	case exp.notFound:
		return false, &Diagnosis{CodeRelayNotFound, notFoundMessage(exp)}, ""
	case u.Expected == nil:
		// Reached through a peer relay, which is what the exit status
		// promises; but not credited to the expected one.
		return true, nil, fmt.Sprintf(
			"%s: this laptop cannot tell whether it is the expected %s (the endpoint is none of the addresses it knows of that node); "+
				"--relay with the endpoint (ip:port, as the relay's /readyz?verbose lists it) checks the endpoint",
			notIdentified(u), exp.label())
	case !*u.Expected:
		carrier := u.Endpoint
		if u.Name != "" {
			carrier = fmt.Sprintf("%s at %s", u.Name, u.Endpoint)
		}
		return false, &Diagnosis{CodeUnexpectedRelay, fmt.Sprintf("carried by relay %s, not the expected %s", carrier, exp.label())}, ""
	}
	return true, nil, ""
}

// notIdentified says that a relay carried the path but not which.
func notIdentified(u *RelayUse) string {
	return fmt.Sprintf("through a peer relay at %s, not identified", u.Endpoint)
}

func notFoundMessage(exp *expectation) string {
	return fmt.Sprintf("expected relay %q is not a node in this laptop's netmap: check the name, and that the policy lets this laptop see it", exp.raw)
}

// diagnoseDERP says why a peer's pongs never left DERP, from the most to
// the least specific reason this laptop can see.
func diagnoseDERP(in verdictInput) *Diagnosis {
	exp := in.exp
	if exp != nil && exp.notFound {
		return &Diagnosis{CodeRelayNotFound, notFoundMessage(exp)}
	}
	if len(in.cands) == 0 && in.listErr == nil {
		if len(in.servers) == 0 {
			return &Diagnosis{CodeNoRelayServers, "no peer relay servers known to this laptop (`tailscale debug peer-relay-servers` lists none): " + grantHelp}
		}
		return &Diagnosis{CodeNoRelayServers, fmt.Sprintf(
			"no peer relay server known to this laptop besides %s: %s for any other node", labels(in.servers), grantHelp)}
	}
	if exp != nil && exp.node != nil {
		return diagnoseExpected(exp)
	}
	if len(in.cands) == 0 {
		return &Diagnosis{CodeRelayServersUnknown, fmt.Sprintf(
			"%v; pass --relay <relay's name> for a diagnosis without it", in.listErr)}
	}
	suffix := ""
	if exp != nil {
		suffix = fmt.Sprintf(" (expected endpoint %s)", exp.endpoint)
	}
	var online, advertising []*RelayServer
	for _, rs := range in.cands {
		if !rs.Probe.offline() {
			online = append(online, rs)
			if rs.Advertising {
				advertising = append(advertising, rs)
			}
		}
	}
	switch {
	case len(online) == 0 && len(in.cands) == 1:
		return &Diagnosis{CodeRelayOffline, offlineMessage("the peer relay server", in.cands[0]) + suffix}
	case len(online) == 0:
		return &Diagnosis{CodeRelayOffline, fmt.Sprintf(
			"every peer relay server this laptop knows is offline (no answer to disco pings): %s%s", labels(in.cands), suffix)}
	case len(advertising) == 0:
		return &Diagnosis{CodeRelayNotAdvertising, fmt.Sprintf(
			"the peer relay servers this laptop knows (%s) do not advertise a relay server (relay port unset?); if one does run it, UDP to its relay endpoints is blocked%s",
			labels(online), suffix)}
	}
	return &Diagnosis{CodeRelayUnreachable, unreachableMessage(labels(advertising)) + suffix}
}

// diagnoseExpected explains a DERP-only peer when --relay names a node.
func diagnoseExpected(exp *expectation) *Diagnosis {
	rs := exp.server
	switch {
	case rs == nil && exp.grantKnown:
		return &Diagnosis{CodeRelayNotGranted, fmt.Sprintf(
			"expected relay %s is not a peer relay server for this laptop (not in `tailscale debug peer-relay-servers`): "+
				"%s for that node, or control does not offer it (offline or not advertising)", exp.label(), grantHelp)}
	case rs == nil:
		return &Diagnosis{CodeRelayServersUnknown, fmt.Sprintf(
			"cannot tell whether expected relay %s is a peer relay server for this laptop: %v", exp.label(), errDebugDenied)}
	case rs.Probe.offline():
		return &Diagnosis{CodeRelayOffline, offlineMessage("expected relay", rs)}
	case !rs.Advertising:
		return &Diagnosis{CodeRelayNotAdvertising, fmt.Sprintf(
			"expected relay %s does not advertise a relay server (its node info says none: relay port unset?); if it does run one, UDP to its relay endpoints is blocked",
			rs.label())}
	}
	return &Diagnosis{CodeRelayUnreachable, unreachableMessage("expected relay " + rs.label())}
}

func offlineMessage(what string, rs *RelayServer) string {
	return fmt.Sprintf("%s %s is offline or not running: it answered none of %d disco pings", what, rs.label(), rs.Probe.Unanswered)
}

func unreachableMessage(who string) string {
	return who + " is known, online and advertising, but no pong came through it: is UDP to its relay endpoints blocked? " +
		"This laptop cannot see those endpoints (the relay's /readyz?verbose lists them); the peer needs the relay grant too"
}
