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

// appliance runs the tailnet side of the relay: it starts the node, follows
// its state on the IPN bus, and runs the reconcile loop, which alone owns
// the desired relay settings (port, endpoints) and decides whether they are
// in force. Endpoint sources send it their findings (foundEndpoints); the
// loop publishes what it applied to status.
type appliance struct {
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

// applianceDeps is what the appliance uses but does not own.
type applianceDeps struct {
	// store keeps the node's state; nil means tsnet's files in
	// TS_STATE_DIR.
	store  ipn.StateStore
	status *status
	events *kubeevents.Recorder
	// onNetChange, if set, is called on every route or address change.
	onNetChange func()
}

// newAppliance returns an appliance for cfg. Until an endpoint source
// reports, it advertises the explicit endpoints, and with a Service to
// follow it says that the Service was not read yet.
func newAppliance(cfg Config, d applianceDeps, logger *slog.Logger) *appliance {
	a := &appliance{
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
	a.relay.endpoints, _ = lbaddr.Merge(cfg.RelayServerStaticEndpoints, nil, lbaddr.MaxEndpoints)
	if d.status.service != "" {
		a.relay.lbWhy = "Service " + d.status.service + " not read yet"
	}
	a.status.setRelay(a.relay)
	return a
}

// foundEndpoints takes the endpoints an endpoint source found (it is
// lbaddr.Config's OnChange) and hands them to the reconcile loop.
func (a *appliance) foundEndpoints(eps []lbaddr.Endpoint, why string) {
	chans.Replace(a.found, found{eps, why})
}

// run starts the node and keeps it configured until ctx is done. It stops
// the node before it returns.
func (a *appliance) run(ctx context.Context) error {
	defer a.closeTailnet()
	// Before start: tsnet takes the key, and the store the login read, only then.
	key, st, err := keyless.Login(ctx, a.cfg.keylessSettings(), keyless.Node{Store: a.ts.Store, StateDir: a.cfg.StateDir,
		Logf: a.ts.Logf, SetStatus: a.status.setKeyless, Events: a.events, Logger: a.logger})
	if err != nil {
		return err
	}
	if key != "" {
		a.ts.AuthKey = key
	}
	a.ts.Store = st
	lc, err := a.startTailnet()
	if err != nil {
		return err
	}
	defer a.watchRejections()()
	if nm, ok := a.ts.Sys().NetMon.GetOK(); ok && a.onNetChange != nil {
		defer nm.RegisterChangeCallback(func(*netmon.ChangeDelta) { a.onNetChange() })()
	}
	watcher, err := lc.WatchIPNBus(ctx, ipn.NotifyInitialState|ipn.NotifyInitialPrefs|ipn.NotifyNoNetMap)
	if err != nil {
		return fmt.Errorf("watch IPN bus: %w", err)
	}
	defer watcher.Close()

	errc := make(chan error, 1)
	go func() { errc <- a.reconcileLoop(ctx, lc) }()
	for {
		n, err := watcher.Next()
		if err != nil {
			if ctx.Err() != nil {
				return <-errc
			}
			return fmt.Errorf("read IPN bus: %w", err)
		}
		a.onNotify(n)
	}
}

// watchRejections logs the allocation requests the relay server extension
// rejected (it reports each sender at most once a minute) and records them
// as Events. Call the returned function to stop.
func (a *appliance) watchRejections() (stop func()) {
	bus, ok := a.ts.Sys().Bus.GetOK()
	if !ok {
		return func() {}
	}
	c := bus.Client("tsrelay.appliance")
	eventbus.SubscribeFunc(c, func(r relayserver.Rejected) {
		a.logger.Warn("rejected a relay endpoint request from a peer", "nodeKey", r.From.ShortString(),
			"disco", r.Disco.ShortString(), "reason", string(r.Reason), "notLogged", r.Suppressed)
		a.events.Warning("RelayRequestRejected", fmt.Sprintf("rejected a relay endpoint request from node %s: %s", r.From.ShortString(), r.Reason))
	})
	return c.Close
}

// startTailnet starts tsnet; it does not wait for login, which may need a
// human. The local client talks to the node in memory. tsnet.Start takes
// no context; Close (on shutdown) cancels what it started.
func (a *appliance) startTailnet() (*local.Client, error) {
	if err := a.ts.Start(); err != nil {
		return nil, fmt.Errorf("start tailscale: %w", err)
	}
	lc, err := a.ts.LocalClient()
	if err != nil {
		return nil, fmt.Errorf("tailscale local client: %w", err)
	}
	a.mu.Lock()
	a.lc = lc
	a.mu.Unlock()
	return lc, nil
}

// localClient returns the node's local client, or nil before it started
// (and before it exists: a nil a, while the identity is held elsewhere).
func (a *appliance) localClient() *local.Client {
	if a == nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lc
}

// closeTailnet stops the node, if it started: closing a tsnet.Server whose
// Start failed panics. State writes are synchronous, so once this returns
// the stored identity is consistent.
func (a *appliance) closeTailnet() {
	if a.localClient() == nil {
		return // never started
	}
	start := time.Now()
	if err := a.ts.Close(); err != nil {
		a.logger.Warn("closing tailscale", "err", err)
		return
	}
	a.logger.Info("tailscale closed", "took", time.Since(start).Round(time.Millisecond))
}

// onNotify records what the backend announced and wakes the reconcile loop
// when something that affects the relay changed.
func (a *appliance) onNotify(n ipn.Notify) {
	if n.ErrMessage != nil && a.status.setBackendError(*n.ErrMessage) {
		// Login errors repeat with every retry; log each one once.
		a.logger.Error("tailscale backend error", "err", *n.ErrMessage)
		a.events.Warning("BackendError", *n.ErrMessage)
	}
	if n.BrowseToURL != nil && *n.BrowseToURL != "" {
		a.logger.Warn("login needed: open this URL, or restart with TS_AUTHKEY set", "url", *n.BrowseToURL)
		// The URL stays in the log: whoever opens it first owns the node.
		a.events.Warning("LoginNeeded", "login needed: open the URL in the relay's log, or set TS_AUTHKEY and restart")
	}
	if n.State != nil {
		if old, changed := a.status.setBackendState(*n.State); changed {
			a.logger.Info("backend state", "from", old.String(), "to", n.State.String())
			switch {
			case *n.State == ipn.Running:
				a.events.Normal("LoggedIn", "logged in to the tailnet")
			case *n.State == ipn.NeedsLogin && old == ipn.Running:
				// Not at start, where NeedsLogin passes by on the way to
				// Running: here the node was logged out or its key expired.
				a.events.Warning("LoginNeeded", "the node was logged out or its key expired: log in again (see the relay's log), or delete the state Secret and restart with TS_AUTHKEY")
			}
		}
	}
	if n.State != nil || n.Prefs != nil || n.LoginFinished != nil {
		chans.Poke(a.kick)
	}
}

// reconcileLoop runs reconcile on every wake-up, every a.resync and every
// report from an endpoint source. It is level-triggered: each pass reads
// the current state instead of trusting the events that caused it.
func (a *appliance) reconcileLoop(ctx context.Context, lc *local.Client) error {
	t := time.NewTicker(a.resync)
	defer t.Stop()
	for {
		if err := a.reconcile(ctx, lc); err != nil && ctx.Err() == nil {
			a.logger.Warn("reconcile", "err", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case f := <-a.found:
			a.takeFound(f)
		case <-a.kick:
		case <-t.C:
		}
	}
}

// takeFound merges endpoints found from the Service with the explicit ones
// into the endpoints to advertise; the pass that follows applies them.
func (a *appliance) takeFound(f found) {
	merged, dropped := lbaddr.Merge(a.cfg.RelayServerStaticEndpoints, f.endpoints, lbaddr.MaxEndpoints)
	if len(dropped) > 0 && !slices.Equal(dropped, a.relay.dropped) {
		a.logger.Warn("too many static endpoints; advertising the explicit ones, then the first found",
			"max", lbaddr.MaxEndpoints, "dropped", endpointList(dropped))
	}
	a.relay.dropped = dropped
	a.relay.lbWhy = f.why
	if len(f.endpoints) > 0 {
		a.relay.lbWhy = ""
	}
	if old := a.relay.endpoints; !slices.Equal(old, merged) {
		a.relay.endpoints = merged
		a.relay.prefsApplied = false // until this pass applies them
		a.logger.Info("static endpoints changed", "from", endpointList(old), "to", endpointList(merged), "why", a.relay.lbWhy)
		a.events.Normal("EndpointsChanged", fmt.Sprintf("static endpoints %s -> %s", orNone(endpointList(old)), orNone(endpointList(merged))))
	}
	a.status.setRelay(a.relay)
}

// reconcile brings the node's relay prefs to the desired ones and records
// whether the relay is serving.
func (a *appliance) reconcile(ctx context.Context, lc *local.Client) error {
	// Read first: a state change after this makes what the pass finds stale.
	seq := a.status.backendSeq()
	st, err := lc.StatusWithoutPeers(ctx)
	if err != nil {
		return fmt.Errorf("read status: %w", err)
	}
	a.relay.seq = seq
	defer func() { a.status.setRelay(a.relay) }()
	node := nodeFrom(st)
	defer func() { a.status.setNode(node) }()
	a.noteRelayClient(st)
	running := st.BackendState == ipn.Running.String()
	// Prefs go in as soon as a logged-in node is Starting, not only once it
	// is Running: the relay server binds while the node connects (tsnet's
	// start resets the prefs, so a restart always needs them applied).
	if !running && st.BackendState != ipn.Starting.String() {
		node.loginPending = st.BackendState == ipn.NeedsLogin.String() && st.AuthURL != ""
		a.setRelayState(false, false, 0)
		return nil
	}
	if st.Self != nil && st.Self.HasCap(tailcfg.NodeAttrDisableRelayServer) {
		node.problem = "the tailnet disabled the relay server on this node (node attribute disable-relay-server)"
		a.setRelayState(false, false, 0)
		return nil
	}
	if err := a.applyRelayPrefs(ctx, lc); err != nil {
		a.setRelayState(false, false, 0)
		return err
	}
	if !running {
		return nil // Running wakes the loop again
	}
	return a.checkRelayBound(ctx, lc)
}

// relayClientWarning is the warning while the relay's node may use other
// relays.
const relayClientWarning = "the tailnet lets this relay use other peer relays (no disable-relay-client node attribute): at Tailscale v1.102.5 any peer can then crash it with one malformed CallMeMaybeVia; add nodeAttrs {target: [tag:relay], attr: [disable-relay-client]} to the tailnet policy (README: Reliability)"

// noteRelayClient logs, when it changes, whether the tailnet lets this node
// use other relays (see relayClientWarning).
func (a *appliance) noteRelayClient(st *ipnstate.Status) {
	if st.Self == nil || st.BackendState != ipn.Running.String() {
		return
	}
	on := !st.Self.HasCap(tailcfg.NodeAttrDisableRelayClient)
	if a.relayClientSeen && a.relayClient == on {
		return
	}
	a.relayClientSeen, a.relayClient = true, on
	if on {
		a.logger.Warn("relay client enabled: " + relayClientWarning)
	} else {
		a.logger.Info("relay client disabled by the tailnet (disable-relay-client); peers cannot reach this node's relay client")
	}
}

// setRelayState records the relay server's state and, when it stops or
// starts listening, logs it and records an Event.
func (a *appliance) setRelayState(prefsApplied, bound bool, sessions int) {
	was := a.relay.bound
	a.relay.prefsApplied, a.relay.bound, a.relay.sessions = prefsApplied, bound, sessions
	port := a.cfg.RelayServerPort
	switch {
	case bound && !was:
		a.logger.Info("relay bound", "port", port)
		a.events.Normal("RelayBound", fmt.Sprintf("peer relay listening on UDP port %d", port))
	case prefsApplied && !bound && was:
		a.logger.Error("relay not bound", "port", port)
		a.events.Warning("RelayNotBound", fmt.Sprintf("peer relay is not listening on UDP port %d (is the port in use?)", port))
	}
}

// applyRelayPrefs sets RelayServerPort and RelayServerStaticEndpoints unless
// they are already in force. `tailscale up` cannot set them, which is why
// people used to `kubectl exec … tailscale set` by hand.
func (a *appliance) applyRelayPrefs(ctx context.Context, lc *local.Client) error {
	prefs, err := lc.GetPrefs(ctx)
	if err != nil {
		return fmt.Errorf("read prefs: %w", err)
	}
	port := uint16(a.cfg.RelayServerPort)
	want := endpointAddrs(a.relay.endpoints)
	if prefs.RelayServerPort != nil && *prefs.RelayServerPort == port &&
		sameEndpoints(prefs.RelayServerStaticEndpoints, want) {
		a.relay.prefsApplied = true
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
	a.relay.prefsApplied = true
	a.logger.Info("relay prefs applied", "from", from, "port", port, "staticEndpoints", Endpoints(want).String())
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
func (a *appliance) checkRelayBound(ctx context.Context, lc *local.Client) error {
	want := uint16(a.cfg.RelayServerPort)
	var lastErr error
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, bindTimeout, true, func(ctx context.Context) (bool, error) {
		rs, err := lc.DebugPeerRelaySessions(ctx)
		lastErr = err
		if err != nil || rs.UDPPort == nil || *rs.UDPPort != want {
			return false, nil
		}
		a.setRelayState(true, true, len(rs.Sessions))
		return true, nil
	})
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	}
	a.setRelayState(true, false, 0)
	if lastErr != nil {
		return fmt.Errorf("read relay status: %w", lastErr)
	}
	return fmt.Errorf("relay server did not bind UDP port %d (is the port in use?)", want)
}

// relaySessions reads the relay server's sessions live, or returns false if
// the node has not started or the relay is not bound.
func (a *appliance) relaySessions(ctx context.Context) ([]readyz.Session, bool) {
	lc := a.localClient()
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
