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
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"

	"github.com/tsrelay/tsrelay/kubeevents"
	"github.com/tsrelay/tsrelay/lbaddr"
)

// appliance runs the tailnet side of the relay: it starts the node, follows
// its state on the IPN bus and keeps the relay prefs in force.
type appliance struct {
	cfg    Config
	logger *slog.Logger
	ts     *tsnet.Server
	status *status
	stats  statsSource          // the state store's counters; nil for a directory
	events *kubeevents.Recorder // nil outside a cluster: records nothing
	derp   *derpRegion          // nil unless TS_DERP_PORT is set

	// kick asks the reconcile loop to run now rather than at the next tick.
	kick chan struct{}
	// resync is how often the reconcile loop runs without being asked
	// (resyncInterval; tests lengthen it to see that wake-ups suffice).
	resync time.Duration
	// netChanged asks watchPathMTU to check the path MTU now.
	netChanged chan struct{}

	mu sync.Mutex
	lc *local.Client // nil until the node has started
}

// newAppliance returns an appliance for cfg; store nil means TS_STATE_DIR.
func newAppliance(cfg Config, store ipn.StateStore, logger *slog.Logger) *appliance {
	stats, _ := store.(statsSource)
	return &appliance{
		cfg:    cfg,
		logger: logger,
		ts:     newTSNet(cfg, store, logger),
		status: newStatus(cfg),
		stats:  stats,
		kick:   make(chan struct{}, 1),
		resync: resyncInterval,

		netChanged: make(chan struct{}, 1),
	}
}

// run starts the node and keeps it configured until ctx is done.
func (a *appliance) run(ctx context.Context) error {
	lc, err := a.startTailnet()
	if err != nil {
		return err
	}
	defer a.watchNetworkChanges()()
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

// localClient returns the node's local client, or nil before it started.
func (a *appliance) localClient() *local.Client {
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
		a.wake()
	}
}

// setFound takes the endpoints found from the Service (lbaddr.Config's
// OnChange), merges them with the explicit ones and, if that changes what
// to advertise, wakes the reconcile loop to apply it.
func (a *appliance) setFound(found []lbaddr.Endpoint, why string) {
	merged, dropped := lbaddr.Merge(a.cfg.RelayServerStaticEndpoints, found, lbaddr.MaxEndpoints)
	if len(dropped) > 0 {
		a.logger.Warn("too many static endpoints; advertising the first ones",
			"max", lbaddr.MaxEndpoints, "dropped", endpointList(dropped))
	}
	if len(found) > 0 {
		why = ""
	}
	old, changed := a.status.setEndpoints(merged, why)
	if !changed {
		return
	}
	a.logger.Info("static endpoints changed", "from", endpointList(old), "to", endpointList(merged), "why", why)
	a.events.Normal("EndpointsChanged", fmt.Sprintf("static endpoints %s -> %s", orNone(endpointList(old)), orNone(endpointList(merged))))
	a.wake()
}

func orNone(s string) string { return cmp.Or(s, "none") }

// endpointList formats endpoints for the log as addr:port(source),...
func endpointList(eps []lbaddr.Endpoint) string {
	s := make([]string, len(eps))
	for i, e := range eps {
		s[i] = e.AddrPort.String() + "(" + string(e.Source) + ")"
	}
	return strings.Join(s, ",")
}

// wake asks the reconcile loop for a pass without blocking.
func (a *appliance) wake() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// reconcileLoop runs reconcile on every wake-up and every a.resync.
// It is level-triggered: each pass reads the current state instead of
// trusting the events that caused it.
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
		case <-a.kick:
		case <-t.C:
		}
	}
}

// reconcile brings the node's relay prefs to the configured ones and records
// whether the relay is serving.
func (a *appliance) reconcile(ctx context.Context, lc *local.Client) error {
	st, err := lc.StatusWithoutPeers(ctx)
	if err != nil {
		return fmt.Errorf("read status: %w", err)
	}
	a.status.setNode(st)
	running := st.BackendState == ipn.Running.String()
	// Prefs go in as soon as a logged-in node is Starting, not only once it
	// is Running: the relay server binds while the node connects (tsnet's
	// start resets the prefs, so a restart always needs them applied).
	// This took a restart's readiness from 0.17 to 0.14 s in `make bench`.
	if !running && st.BackendState != ipn.Starting.String() {
		if st.BackendState == ipn.NeedsLogin.String() && st.AuthURL != "" {
			a.status.setLoginPending()
		}
		return nil
	}
	if st.Self != nil && st.Self.HasCap(tailcfg.NodeAttrDisableRelayServer) {
		a.status.setRelay(false, false, 0)
		a.status.setProblem("the tailnet disabled the relay server on this node (node attribute disable-relay-server)")
		return nil
	}
	if err := a.applyRelayPrefs(ctx, lc); err != nil {
		a.status.setRelay(false, false, 0)
		return err
	}
	if !running {
		return nil // Running wakes the loop again
	}
	return a.checkRelayBound(ctx, lc)
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
	want := a.status.endpointAddrs()
	if prefs.RelayServerPort != nil && *prefs.RelayServerPort == port &&
		sameEndpoints(prefs.RelayServerStaticEndpoints, want) {
		return nil
	}
	from := "unset"
	if prefs.RelayServerPort != nil {
		from = fmt.Sprintf("port=%d endpoints=%v", *prefs.RelayServerPort, prefs.RelayServerStaticEndpoints)
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
	a.logger.Info("relay prefs applied", "from", from, "port", port, "staticEndpoints", Endpoints(want).String())
	return nil
}

// sameEndpoints compares endpoint sets, ignoring order.
func sameEndpoints(a, b []netip.AddrPort) bool {
	if len(a) != len(b) {
		return false
	}
	cmp := func(x, y netip.AddrPort) int { return x.Compare(y) }
	a, b = slices.SortedFunc(slices.Values(a), cmp), slices.SortedFunc(slices.Values(b), cmp)
	return slices.Equal(a, b)
}

// checkRelayBound waits up to bindTimeout for the relay server to report its
// socket. A relay that is advertised but not bound is worse than none: peers
// keep trying it, so it must keep readiness failing.
func (a *appliance) checkRelayBound(ctx context.Context, lc *local.Client) error {
	want := uint16(a.cfg.RelayServerPort)
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, bindTimeout)
	defer cancel()
	for {
		rs, err := lc.DebugPeerRelaySessions(ctx)
		if err == nil && rs.UDPPort != nil && *rs.UDPPort == want {
			if a.status.setRelay(true, true, len(rs.Sessions)) {
				a.logger.Info("relay bound", "port", want)
				a.events.Normal("RelayBound", fmt.Sprintf("peer relay listening on UDP port %d", want))
			}
			return nil
		}
		select {
		case <-ctx.Done():
			if parent.Err() != nil {
				return parent.Err()
			}
			if a.status.setRelay(true, false, 0) {
				a.logger.Error("relay not bound", "port", want, "err", err)
				a.events.Warning("RelayNotBound", fmt.Sprintf("peer relay is not listening on UDP port %d (is the port in use?)", want))
			}
			if err != nil {
				return fmt.Errorf("read relay status: %w", err)
			}
			return fmt.Errorf("relay server did not bind UDP port %d (is the port in use?)", want)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
