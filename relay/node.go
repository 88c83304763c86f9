package relay

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/util/eventbus"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/tsrelay/tsrelay/internal/chans"
	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/keyless"
	"github.com/tsrelay/tsrelay/kubeevents"
	"github.com/tsrelay/tsrelay/lbaddr"
	"github.com/tsrelay/tsrelay/relayserver"
)

// tailnetNode runs the tailnet side of the relay: it starts the node, follows
// its state on the IPN bus, and runs the reconcile loop, which alone owns
// the desired relay settings (port, endpoints) and decides whether they are
// in force. Endpoint sources send it their findings (foundEndpoints); the
// loop publishes what it applied to status.
type tailnetNode struct {
	cfg    Config
	logger *slog.Logger
	ts     *tsnet.Server
	status *status
	events *kubeevents.Recorder // nil outside a cluster: records nothing
	// onNetChange is called when the node's network monitor sees routes
	// or addresses change (the path MTU watcher's poke); may be nil.
	onNetChange func()

	// kick asks the reconcile loop to run now rather than at the next tick.
	kick chan struct{}
	// found carries the latest endpoints found from the Service to the
	// reconcile loop (a mailbox of one: see chans.Replace).
	found chan found
	// resync is how often the reconcile loop runs without being asked
	// (resyncInterval; tests lengthen it to see that wake-ups suffice).
	resync time.Duration

	// relay is the reconcile loop's own: the desired endpoints and what
	// it last found in force. Only the loop (and newAppliance, before it
	// starts) touches it; status gets copies.
	relay relayView

	// relayClient is whether the node may use other relays, as last
	// logged; relayClientSeen is false until it was. The reconcile loop's.
	relayClient, relayClientSeen bool

	mu sync.Mutex
	lc *local.Client // nil until the node has started
}

// found is what an endpoint source reports: the endpoints it found, or why
// it found none.
type found struct {
	endpoints []lbaddr.Endpoint
	why       string
}

// tailnetNodeDeps is what the tailnet node uses but does not own.
type tailnetNodeDeps struct {
	// store keeps the node's state; nil means tsnet's files in
	// TS_STATE_DIR.
	store  ipn.StateStore
	status *status
	events *kubeevents.Recorder
	// onNetChange, if set, is called on every route or address change.
	onNetChange func()
}

// newTailnetNode returns the tailnet node for cfg. Until an endpoint source
// reports, it advertises the explicit endpoints, and with a Service to
// follow it says that the Service was not read yet.
func newTailnetNode(cfg Config, d tailnetNodeDeps, logger *slog.Logger) *tailnetNode {
	n := &tailnetNode{
		cfg:         cfg,
		logger:      logger,
		ts:          newTSNet(cfg, d.store, logger),
		status:      d.status,
		events:      d.events,
		onNetChange: d.onNetChange,
		kick:        make(chan struct{}, 1),
		found:       make(chan found, 1),
		resync:      resyncInterval,
	}
	n.relay.endpoints, _ = lbaddr.Merge(cfg.RelayServerStaticEndpoints, nil, lbaddr.MaxEndpoints)
	if d.status.service != "" {
		n.relay.lbWhy = "Service " + d.status.service + " not read yet"
	}
	n.status.setRelay(n.relay)
	return n
}

// foundEndpoints takes the endpoints an endpoint source found (it is
// lbaddr.Config's OnChange) and hands them to the reconcile loop.
func (n *tailnetNode) foundEndpoints(eps []lbaddr.Endpoint, why string) {
	chans.Replace(n.found, found{eps, why})
}

// run starts the node and keeps it configured until ctx is done. It stops
// the node before it returns.
func (n *tailnetNode) run(ctx context.Context) error {
	defer n.closeTailnet()
	// Before start: tsnet takes the key, and the store the login read, only then.
	key, st, err := keyless.Login(ctx, n.cfg.keylessSettings(), keyless.Node{Store: n.ts.Store, StateDir: n.cfg.StateDir,
		Logf: n.ts.Logf, SetStatus: n.status.setKeyless, Events: n.events, Logger: n.logger})
	if err != nil {
		return err
	}
	if key != "" {
		n.ts.AuthKey = key
	}
	n.ts.Store = st
	lc, err := n.startTailnet()
	if err != nil {
		return err
	}
	defer n.watchRelayServer()()
	if nm, ok := n.ts.Sys().NetMon.GetOK(); ok && n.onNetChange != nil {
		defer nm.RegisterChangeCallback(func(*netmon.ChangeDelta) { n.onNetChange() })()
	}
	watcher, err := lc.WatchIPNBus(ctx, ipn.NotifyInitialState|ipn.NotifyInitialPrefs|ipn.NotifyNoNetMap)
	if err != nil {
		return fmt.Errorf("watch IPN bus: %w", err)
	}
	defer watcher.Close()

	errc := make(chan error, 1)
	go func() { errc <- n.reconcileLoop(ctx, lc) }()
	for {
		msg, err := watcher.Next()
		if err != nil {
			if ctx.Err() != nil {
				return <-errc
			}
			return fmt.Errorf("read IPN bus: %w", err)
		}
		n.onNotify(msg)
	}
}

// watchRelayServer logs the allocation requests the relay server extension
// rejected (it reports each sender at most once a minute) and records them
// as Events, and logs whether its sockets got their socket filter. Call the
// returned function to stop.
func (n *tailnetNode) watchRelayServer() (stop func()) {
	bus, ok := n.ts.Sys().Bus.GetOK()
	if !ok {
		return func() {}
	}
	c := bus.Client("tsrelay.appliance")
	eventbus.SubscribeFunc(c, func(r relayserver.Rejected) {
		n.logger.Warn("rejected a relay endpoint request from a peer", "nodeKey", r.From.ShortString(),
			"disco", r.Disco.ShortString(), "reason", string(r.Reason), "notLogged", r.Suppressed)
		n.events.Warning("RelayRequestRejected", fmt.Sprintf("rejected a relay endpoint request from node %s: %s", r.From.ShortString(), r.Reason))
	})
	eventbus.SubscribeFunc(c, func(f relayserver.SocketsFiltered) {
		if f.Err != nil {
			n.logger.Warn("relay sockets are not all filtered: junk sent to the relay port costs more CPU", "port", f.Port, "filtered", f.Filtered, "err", f.Err)
			n.events.Warning("RelaySocketsUnfiltered", fmt.Sprintf("%d relay sockets on port %d filtered: %v", f.Filtered, f.Port, f.Err))
			return
		}
		n.logger.Info("relay sockets filtered", "port", f.Port, "sockets", f.Filtered)
	})
	return c.Close
}

// startTailnet starts tsnet; it does not wait for login, which may need a
// human. The local client talks to the node in memory. tsnet.Start takes
// no context; Close (on shutdown) cancels what it started.
func (n *tailnetNode) startTailnet() (*local.Client, error) {
	if err := n.ts.Start(); err != nil {
		return nil, fmt.Errorf("start tailscale: %w", err)
	}
	lc, err := n.ts.LocalClient()
	if err != nil {
		return nil, fmt.Errorf("tailscale local client: %w", err)
	}
	n.mu.Lock()
	n.lc = lc
	n.mu.Unlock()
	return lc, nil
}

// localClient returns the node's local client, or nil before it started
// (and before it exists: a nil a, while the identity is held elsewhere).
func (n *tailnetNode) localClient() *local.Client {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.lc
}

// closeTailnet stops the node, if it started: closing a tsnet.Server whose
// Start failed panics. State writes are synchronous, so once this returns
// the stored identity is consistent.
func (n *tailnetNode) closeTailnet() {
	if n.localClient() == nil {
		return // never started
	}
	start := time.Now()
	if err := n.ts.Close(); err != nil {
		n.logger.Warn("closing tailscale", "err", err)
		return
	}
	n.logger.Info("tailscale closed", "took", time.Since(start).Round(time.Millisecond))
}

// onNotify records what the backend announced and wakes the reconcile loop
// when something that affects the relay changed.
func (n *tailnetNode) onNotify(note ipn.Notify) {
	if note.ErrMessage != nil && n.status.setBackendError(*note.ErrMessage) {
		// Login errors repeat with every retry; log each one once.
		n.logger.Error("tailscale backend error", "err", *note.ErrMessage)
		n.events.Warning("BackendError", *note.ErrMessage)
	}
	if note.BrowseToURL != nil && *note.BrowseToURL != "" {
		n.logger.Warn("login needed: open this URL, or restart with TS_AUTHKEY set", "url", *note.BrowseToURL)
		// The URL stays in the log: whoever opens it first owns the node.
		n.events.Warning("LoginNeeded", "login needed: open the URL in the relay's log, or set TS_AUTHKEY and restart")
	}
	if note.State != nil {
		if old, changed := n.status.setBackendState(*note.State); changed {
			n.logger.Info("backend state", "from", old.String(), "to", note.State.String())
			switch {
			case *note.State == ipn.Running:
				n.events.Normal("LoggedIn", "logged in to the tailnet")
			case *note.State == ipn.NeedsLogin && old == ipn.Running:
				// Not at start, where NeedsLogin passes by on the way to
				// Running: here the node was logged out or its key expired.
				n.events.Warning("LoginNeeded", "the node was logged out or its key expired: log in again (see the relay's log), or delete the state Secret and restart with TS_AUTHKEY")
			}
		}
	}
	if note.State != nil || note.Prefs != nil || note.LoginFinished != nil {
		chans.Poke(n.kick)
	}
}

// reconcileLoop runs reconcile on every wake-up, every n.resync and every
// report from an endpoint source. It is level-triggered: each pass reads
// the current state instead of trusting the events that caused it.
func (n *tailnetNode) reconcileLoop(ctx context.Context, lc *local.Client) error {
	t := time.NewTicker(n.resync)
	defer t.Stop()
	for {
		if err := n.reconcile(ctx, lc); err != nil && ctx.Err() == nil {
			n.logger.Warn("reconcile", "err", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case f := <-n.found:
			n.takeFound(f)
		case <-n.kick:
		case <-t.C:
		}
	}
}

// takeFound merges endpoints found from the Service with the explicit ones
// into the endpoints to advertise; the pass that follows applies them.
func (n *tailnetNode) takeFound(f found) {
	merged, dropped := lbaddr.Merge(n.cfg.RelayServerStaticEndpoints, f.endpoints, lbaddr.MaxEndpoints)
	if len(dropped) > 0 && !slices.Equal(dropped, n.relay.dropped) {
		n.logger.Warn("too many static endpoints; advertising the explicit ones, then the first found",
			"max", lbaddr.MaxEndpoints, "dropped", endpointList(dropped))
	}
	n.relay.dropped = dropped
	n.relay.lbWhy = f.why
	if len(f.endpoints) > 0 {
		n.relay.lbWhy = ""
	}
	if old := n.relay.endpoints; !slices.Equal(old, merged) {
		n.relay.endpoints = merged
		n.relay.prefsApplied = false // until this pass applies them
		n.logger.Info("static endpoints changed", "from", endpointList(old), "to", endpointList(merged), "why", n.relay.lbWhy)
		n.events.Normal("EndpointsChanged", fmt.Sprintf("static endpoints %s -> %s", orNone(endpointList(old)), orNone(endpointList(merged))))
	}
	n.status.setRelay(n.relay)
}

// reconcile brings the node's relay prefs to the desired ones and records
// whether the relay is serving.
func (n *tailnetNode) reconcile(ctx context.Context, lc *local.Client) error {
	// Read first: a state change after this makes what the pass finds stale.
	seq := n.status.backendSeq()
	st, err := lc.StatusWithoutPeers(ctx)
	if err != nil {
		return fmt.Errorf("read status: %w", err)
	}
	n.relay.seq = seq
	defer func() { n.status.setRelay(n.relay) }()
	node := nodeFrom(st)
	defer func() { n.status.setNode(node) }()
	n.noteRelayClient(st)
	running := st.BackendState == ipn.Running.String()
	// Prefs go in as soon as a logged-in node is Starting, not only once it
	// is Running: the relay server binds while the node connects (tsnet's
	// start resets the prefs, so a restart always needs them applied).
	if !running && st.BackendState != ipn.Starting.String() {
		node.loginPending = st.BackendState == ipn.NeedsLogin.String() && st.AuthURL != ""
		n.setRelayState(false, false, 0)
		return nil
	}
	if st.Self != nil && st.Self.HasCap(tailcfg.NodeAttrDisableRelayServer) {
		node.problem = "the tailnet disabled the relay server on this node (node attribute disable-relay-server)"
		n.setRelayState(false, false, 0)
		return nil
	}
	if err := n.applyRelayPrefs(ctx, lc); err != nil {
		n.setRelayState(false, false, 0)
		return err
	}
	if !running {
		return nil // Running wakes the loop again
	}
	return n.checkRelayBound(ctx, lc)
}

// relayClientWarning is the warning while the relay's node may use other
// relays.
const relayClientWarning = "the tailnet lets this relay use other peer relays (no disable-relay-client node attribute): at Tailscale v1.102.5 any peer can then crash it with one malformed CallMeMaybeVia; add nodeAttrs {target: [tag:relay], attr: [disable-relay-client]} to the tailnet policy (README: Reliability)"

// noteRelayClient logs, when it changes, whether the tailnet lets this node
// use other relays (see relayClientWarning).
func (n *tailnetNode) noteRelayClient(st *ipnstate.Status) {
	if st.Self == nil || st.BackendState != ipn.Running.String() {
		return
	}
	on := !st.Self.HasCap(tailcfg.NodeAttrDisableRelayClient)
	if n.relayClientSeen && n.relayClient == on {
		return
	}
	n.relayClientSeen, n.relayClient = true, on
	if on {
		n.logger.Warn("relay client enabled: " + relayClientWarning)
	} else {
		n.logger.Info("relay client disabled by the tailnet (disable-relay-client); peers cannot reach this node's relay client")
	}
}

// setRelayState records the relay server's state and, when it stops or
// starts listening, logs it and records an Event.
func (n *tailnetNode) setRelayState(prefsApplied, bound bool, sessions int) {
	was := n.relay.bound
	n.relay.prefsApplied, n.relay.bound, n.relay.sessions = prefsApplied, bound, sessions
	port := n.cfg.RelayServerPort
	switch {
	case bound && !was:
		n.logger.Info("relay bound", "port", port)
		n.events.Normal("RelayBound", fmt.Sprintf("peer relay listening on UDP port %d", port))
	case prefsApplied && !bound && was:
		n.logger.Error("relay not bound", "port", port)
		n.events.Warning("RelayNotBound", fmt.Sprintf("peer relay is not listening on UDP port %d (is the port in use?)", port))
	}
}

// applyRelayPrefs sets RelayServerPort and RelayServerStaticEndpoints unless
// they are already in force. `tailscale up` cannot set them, which is why
// people used to `kubectl exec … tailscale set` by hand.
func (n *tailnetNode) applyRelayPrefs(ctx context.Context, lc *local.Client) error {
	prefs, err := lc.GetPrefs(ctx)
	if err != nil {
		return fmt.Errorf("read prefs: %w", err)
	}
	port := uint16(n.cfg.RelayServerPort)
	want := endpointAddrs(n.relay.endpoints)
	if prefs.RelayServerPort != nil && *prefs.RelayServerPort == port &&
		sameEndpoints(prefs.RelayServerStaticEndpoints, want) {
		n.relay.prefsApplied = true
		return nil
	}
	from := "unset"
	if prefs.RelayServerPort != nil {
		from = fmt.Sprintf("port=%d endpoints=%s", *prefs.RelayServerPort, Endpoints(prefs.RelayServerStaticEndpoints))
	}
	_, err = lc.EditPrefs(ctx, &ipn.MaskedPrefs{
		Prefs: ipn.Prefs{
			RelayServerPort:            &port,
			RelayServerStaticEndpoints: want,
		},
		RelayServerPortSet:            true,
		RelayServerStaticEndpointsSet: true,
	})
	if err != nil {
		return fmt.Errorf("set relay prefs (port %d): %w", port, err)
	}
	n.relay.prefsApplied = true
	n.logger.Info("relay prefs applied", "from", from, "port", port, "staticEndpoints", Endpoints(want).String())
	return nil
}

// sameEndpoints compares endpoint sets, ignoring order.
func sameEndpoints(a, b []netip.AddrPort) bool {
	if len(a) != len(b) {
		return false
	}
	a, b = slices.SortedFunc(slices.Values(a), netip.AddrPort.Compare), slices.SortedFunc(slices.Values(b), netip.AddrPort.Compare)
	return slices.Equal(a, b)
}

// checkRelayBound waits up to bindTimeout for the relay server to report its
// socket. A relay that is advertised but not bound is worse than none: peers
// keep trying it, so it must keep readiness failing.
func (n *tailnetNode) checkRelayBound(ctx context.Context, lc *local.Client) error {
	want := uint16(n.cfg.RelayServerPort)
	var lastErr error
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, bindTimeout, true, func(ctx context.Context) (bool, error) {
		rs, err := lc.DebugPeerRelaySessions(ctx)
		lastErr = err
		if err != nil || rs.UDPPort == nil || *rs.UDPPort != want {
			return false, nil
		}
		n.setRelayState(true, true, len(rs.Sessions))
		return true, nil
	})
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	}
	n.setRelayState(true, false, 0)
	if lastErr != nil {
		return fmt.Errorf("read relay status: %w", lastErr)
	}
	return fmt.Errorf("relay server did not bind UDP port %d (is the port in use?)", want)
}

// relaySessions reads the relay server's sessions live, or returns false if
// the node has not started or the relay is not bound.
func (n *tailnetNode) relaySessions(ctx context.Context) ([]readyz.Session, bool) {
	lc := n.localClient()
	if lc == nil {
		return nil, false
	}
	ctx, cancel := context.WithTimeout(ctx, localAPITimeout)
	defer cancel()
	rs, err := lc.DebugPeerRelaySessions(ctx)
	if err != nil || rs.UDPPort == nil {
		return nil, false
	}
	out := make([]readyz.Session, 0, len(rs.Sessions))
	for _, s := range rs.Sessions {
		out = append(out, readyz.Session{VNI: s.VNI, Clients: [2]readyz.Client{
			{Endpoint: s.Client1.Endpoint, PacketsTx: s.Client1.PacketsTx, BytesTx: s.Client1.BytesTx},
			{Endpoint: s.Client2.Endpoint, PacketsTx: s.Client2.PacketsTx, BytesTx: s.Client2.BytesTx},
		}})
	}
	return out, true
}

// endpointAddrs returns the addresses of eps.
func endpointAddrs(eps []lbaddr.Endpoint) []netip.AddrPort {
	out := make([]netip.AddrPort, len(eps))
	for i, e := range eps {
		out[i] = e.AddrPort
	}
	return out
}

// endpointList formats endpoints for the log as addr:port(source),...
func endpointList(eps []lbaddr.Endpoint) string {
	s := make([]string, len(eps))
	for i, e := range eps {
		s[i] = e.String()
	}
	return strings.Join(s, ",")
}

func orNone(s string) string { return cmp.Or(s, "none") }

// newTSNet configures the userspace Tailscale node. Tailscale's own backend
// log is very chatty and meant for Tailscale's engineers, so it is dropped
// unless TS_BACKEND_LOGS asks for it.
func newTSNet(cfg Config, store ipn.StateStore, logger *slog.Logger) *tsnet.Server {
	backend := func(string, ...any) {}
	if cfg.BackendLogs {
		bl := logger.With("src", "tailscale")
		backend = func(format string, args ...any) { bl.Info(fmt.Sprintf(format, args...)) }
	}
	ul := logger.With("src", "tsnet")
	return &tsnet.Server{
		Dir:           cfg.StateDir,
		Hostname:      cfg.Hostname,
		AuthKey:       cfg.AuthKey,
		ClientSecret:  cfg.ClientSecret,
		AdvertiseTags: cfg.AdvertiseTags,
		ControlURL:    cfg.ControlURL,
		Port:          uint16(cfg.WireGuardPort),
		Logf:          backend,
		// tsnet's user-facing lines repeat what this package logs itself
		// (the auth URL every few seconds, state changes).
		UserLogf: func(format string, args ...any) { ul.Debug(fmt.Sprintf(format, args...)) },
		Store:    store,
	}
}
