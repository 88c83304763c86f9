package relay

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/internal/chans"
	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/lbaddr"
	"github.com/tsrelay/tsrelay/pathmtu"
)

// status is what the relay knows about itself: observations only, each
// part with one writer, read by the HTTP handlers and metrics.
//   - identity: the identity guard, from before the node exists.
//   - backend (state, last error): the IPN bus reader, tailnetNode.onNotify.
//   - node and relay: the reconcile loop, which also owns the desired relay
//     settings and publishes what it applied here.
//   - mtu: the path MTU watcher.
//   - derp: the DERP region, once, when it is set up.
type status struct {
	port    uint16 // TS_RELAY_SERVER_PORT
	service string // namespace/name of the Service followed, or ""
	// advertisedChanged is poked when the endpoints to advertise change
	// (for the DERP region's derpMap, which lists their IPs).
	advertisedChanged chan struct{}

	mu       sync.Mutex
	identity identityView
	// backend is the IPN state as the bus announced it.
	backend backendView
	node    nodeView
	relay   relayView
	mtu     mtuCheck // the last path MTU check; never affects readiness
	derp    derpView
	// keyless is why keyless login has no auth key yet, or "": the
	// control server's refusal, never the token.
	keyless string
}

// identityView is the node identity this process runs or waits for.
type identityView struct {
	state string // where it lives: the state Secret as namespace/name, or TS_STATE_DIR
	// waiting is true until this process holds the identity: another
	// process may run the node, and this one must not start it.
	waiting bool
	heldBy  string // who holds it while this process waits, once known
}

// derpView is the DERP region's part of readiness (a
// *derpregion.Instance); nil when it is off.
type derpView interface {
	// Readiness reports whether the region serves, and if not, why.
	Readiness() (ready bool, reason string)
	// Warning says what to do when the tailnet's derpMap pins another
	// certificate than the one served; "" when it does not.
	Warning() string
}

// backendView is what the IPN bus announced last.
type backendView struct {
	state ipn.State
	err   string // last error announced; cleared when Running
	// seq counts state changes; relay flags count only if the reconcile
	// pass that set them began after the latest one.
	seq uint64
}

// nodeView is what the node reports about itself, read by each reconcile
// pass.
type nodeView struct {
	ips          []netip.Addr
	dnsName      string
	health       []string
	loginPending bool   // NeedsLogin with an auth URL: a human must act
	problem      string // a reason not to be ready the backend does not know
	// relayClient is true when the node may use other peer relays: the
	// tailnet did not give it the disable-relay-client attribute.
	relayClient bool
}

// relayView is the reconcile loop's view of the relay: the endpoints it
// wants advertised and whether they are in force.
type relayView struct {
	// seq is backendView.seq when the pass that set the flags began.
	seq uint64
	// endpoints are the static endpoints to advertise: the explicit ones,
	// then those found from the Service (see lbaddr.Merge).
	endpoints []lbaddr.Endpoint
	// dropped were found but cut: past lbaddr.MaxEndpoints.
	dropped []lbaddr.Endpoint
	// lbWhy says why no endpoint was found from the Service, while none is.
	lbWhy        string
	prefsApplied bool
	bound        bool
	sessions     int
}

// mtuCheck is the last path MTU check, for /readyz and /metrics.
type mtuCheck struct {
	report  pathmtu.Report
	err     string // why the check failed, or ""
	checked bool
}

// newStatus returns the status of a relay on port that follows the
// Service ref ("namespace/name"; "" for none).
func newStatus(port uint16, service string) *status {
	return &status{port: port, service: service, advertisedChanged: make(chan struct{}, 1)}
}

// setIdentity records the node identity and whether this process waits
// for it.
func (s *status) setIdentity(v identityView) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.identity = v
}

// setIdentityHolder records who holds the node identity while this process
// waits for it; once this process has held it, it changes nothing.
func (s *status) setIdentityHolder(holder string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.identity.waiting {
		s.identity.heldBy = holder
	}
}

// nodeIdentity returns the node identity's part of the status.
func (s *status) nodeIdentity() identityView {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.identity
}

// setBackendState records the IPN state and reports the previous one.
func (s *status) setBackendState(st ipn.State) (old ipn.State, changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old = s.backend.state
	if old != st {
		s.backend.state = st
		s.backend.seq++
	}
	if st == ipn.Running {
		s.backend.err = ""
	}
	return old, old != st
}

// setBackendError records an error the backend announced and reports
// whether it differs from the last one.
func (s *status) setBackendError(msg string) (changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed = s.backend.err != msg
	s.backend.err = msg
	return changed
}

// backendSeq returns the count of backend state changes so far; a
// reconcile pass reads it first and hands it back to setRelay.
func (s *status) backendSeq() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.backend.seq
}

// setNode records what a reconcile pass read about the node. The login
// URL itself is logged, never served: /readyz may be reachable through the
// load balancer, and whoever opens the URL first owns the node.
func (s *status) setNode(n nodeView) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.node = n
}

// nodeFrom is the part of a node's status that /readyz shows.
func nodeFrom(st *ipnstate.Status) nodeView {
	n := nodeView{ips: st.TailscaleIPs, health: st.Health}
	if st.Self != nil {
		n.dnsName = strings.TrimSuffix(st.Self.DNSName, ".")
		n.relayClient = !st.Self.HasCap(tailcfg.NodeAttrDisableRelayClient)
	}
	return n
}

// setRelay records the reconcile loop's view of the relay.
func (s *status) setRelay(r relayView) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !slices.Equal(s.relay.endpoints, r.endpoints) {
		chans.Poke(s.advertisedChanged)
	}
	r.endpoints, r.dropped = slices.Clone(r.endpoints), slices.Clone(r.dropped)
	s.relay = r
}

// advertised returns the addresses of the endpoints to advertise.
func (s *status) advertised() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return endpointAddrs(s.relay.endpoints)
}

// endpointsChanged is poked when what advertised returns changes; it has
// one reader.
func (s *status) endpointsChanged() <-chan struct{} { return s.advertisedChanged }

// setKeyless records why keyless login has no auth key yet ("" once it
// has one).
func (s *status) setKeyless(why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keyless = why
}

// setDERP records the DERP region, whose readiness becomes part of the
// relay's.
func (s *status) setDERP(d derpView) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.derp = d
}

// setPathMTU records a check and reports whether its verdict differs from
// the last one: another interface or MTU, another problem, or another
// error.
func (s *status) setPathMTU(c mtuCheck) (changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.mtu
	s.mtu = c
	return !old.checked || old.err != c.err || old.report.Tunnel != c.report.Tunnel ||
		!slices.Equal(old.report.Paths, c.report.Paths)
}

// pathMTU returns the last check.
func (s *status) pathMTU() mtuCheck {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mtu
}

// readiness reports whether the relay is serving, and if not, why, in one
// line that starts with the condition (NeedsLogin, relay not bound, …).
func (s *status) readiness() (ready bool, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.readinessLocked()
}

func (s *status) readinessLocked() (bool, string) {
	detail := func(state string) string {
		switch {
		case s.backend.err != "":
			return state + ": " + s.backend.err
		case s.node.loginPending:
			return state + ": login URL printed in the log; open it, or restart with TS_AUTHKEY set"
		case len(s.node.health) > 0:
			return state + ": " + strings.Join(s.node.health, "; ")
		}
		return state
	}
	if s.identity.waiting {
		return false, "waiting for the node identity, held by " + cmp.Or(s.identity.heldBy, "not yet known")
	}
	switch s.backend.state {
	case ipn.NoState:
		if s.keyless != "" {
			return false, "keyless login: " + s.keyless
		}
		return false, "starting"
	case ipn.NeedsLogin:
		return false, detail("NeedsLogin")
	case ipn.NeedsMachineAuth:
		return false, "NeedsMachineAuth: approve this device in the tailnet's admin console"
	case ipn.Stopped:
		return false, "Stopped"
	case ipn.Starting:
		return false, detail("Starting")
	}
	// Running. Flags set before the latest state change say nothing about
	// the node as it is now.
	current := s.relay.seq == s.backend.seq
	switch {
	case s.node.problem != "":
		return false, s.node.problem
	case s.service != "" && len(s.relay.endpoints) == 0:
		// Advertising only pod-network addresses would send peers to an
		// address they cannot reach.
		return false, "waiting for load balancer address: " + s.relay.lbWhy
	case !current || !s.relay.prefsApplied:
		return false, "relay prefs not applied yet"
	case !s.relay.bound:
		return false, fmt.Sprintf("relay not bound on UDP port %d", s.port)
	}
	if s.derp != nil {
		if ok, why := s.derp.Readiness(); !ok {
			return false, why
		}
	}
	return true, "ok"
}

// snapshot returns the status as /readyz?verbose shows it, without the live
// session table (see tailnetNode.relaySessions).
func (s *status) snapshot() readyz.Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	ready, reason := s.readinessLocked()
	current := s.relay.seq == s.backend.seq && s.backend.state == ipn.Running
	return readyz.Status{
		Ready:        ready,
		Reason:       reason,
		BackendState: s.backend.state.String(),
		DNSName:      s.node.dnsName,
		TailscaleIPs: slices.Clone(s.node.ips),
		Relay: readyz.Relay{
			Port:             s.port,
			PrefsApplied:     current && s.relay.prefsApplied,
			Bound:            current && s.relay.bound,
			StaticEndpoints:  endpointsJSON(s.relay.endpoints),
			DroppedEndpoints: endpointsJSON(s.relay.dropped),
			Service:          s.service,
			Sessions:         s.relay.sessions,
			ClientEnabled:    s.node.relayClient,
		},
		Health:   slices.Clone(s.node.health),
		PathMTU:  pathMTUStatus(s.mtu),
		Warnings: s.warningsLocked(),
	}
}

// warningsLocked lists what slows relaying down without stopping it.
func (s *status) warningsLocked() []string {
	var out []string
	if w := s.mtu.report.Summary(); w != "" {
		out = append(out, w)
	}
	if s.derp != nil {
		if w := s.derp.Warning(); w != "" {
			out = append(out, w)
		}
	}
	return out
}

// pathMTUStatus converts a check for the verbose /readyz; nil before the
// first check.
func pathMTUStatus(c mtuCheck) *readyz.PathMTU {
	if !c.checked {
		return nil
	}
	out := &readyz.PathMTU{
		OK:             c.err == "" && c.report.OK(),
		NeedIPv4:       pathmtu.NeededIPv4,
		NeedIPv6:       pathmtu.NeededIPv6,
		Paths:          []readyz.Path{},
		TunnelInTunnel: c.report.Tunnel,
		Error:          c.err,
	}
	for _, p := range c.report.Paths {
		out.Paths = append(out.Paths, readyz.Path{
			Family: string(p.Family), Interface: p.Interface, Kind: p.Kind, LinkMTU: p.LinkMTU, RouteMTU: p.RouteMTU,
			MTU: p.MTU(), TooSmall: p.TooSmall(),
		})
	}
	return out
}

// endpointsJSON converts endpoints for the verbose /readyz.
func endpointsJSON(eps []lbaddr.Endpoint) []readyz.Endpoint {
	if eps == nil {
		return nil
	}
	out := make([]readyz.Endpoint, len(eps))
	for i, e := range eps {
		out[i] = readyz.Endpoint{AddrPort: e.AddrPort, Source: string(e.Source)}
	}
	return out
}
