// Package relay is the tsrelay appliance: a userspace Tailscale node (tsnet)
// that turns itself into a peer relay at startup, keeps the relay settings in
// force while it runs, and reports honestly over HTTP whether it is relaying.
package relay

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"net"
	"time"

	"golang.org/x/sync/errgroup"
	"tailscale.com/envknob"
	"tailscale.com/feature"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/memtune"
	"github.com/tsrelay/tsrelay/kubeevents"
	// tsnet does not link a peer relay server. Without one, RelayServerPort
	// is still accepted and advertised, so peers keep trying the relay, but
	// nothing listens. This is tsrelay's own, which checks what peers ask of
	// it (Tailscale's, with the tsrelay_upstream_relayserver build tag).
	// Run refuses to start without one.
	"github.com/tsrelay/tsrelay/relayserver"
)

// Timings of the reconcile loop.
const (
	// resyncInterval bounds how long a drifted pref or a lost relay socket
	// goes unnoticed when no IPN bus event announces it.
	resyncInterval = 10 * time.Second
	// bindTimeout is how long the relay server gets to bind its socket
	// after the prefs are applied; it binds synchronously in practice.
	bindTimeout = 5 * time.Second
)

// Run runs the relay until ctx is done or a component fails. It returns
// nil after a clean shutdown. Everything that is checked before anything
// long-running starts (the Kubernetes client, the state Secret, the HTTP
// port, the Service's RBAC) fails here, with the setting it came from.
func Run(ctx context.Context, cfg Config, logger *slog.Logger) error {
	if !feature.IsRegistered(relayserver.Name) {
		return errors.New("this binary was built without a peer relay server (package relayserver); it cannot relay")
	}
	if cfg.NoLogsNoSupport {
		envknob.SetNoLogsNoSupport() // the same as tsnet's own reading of the variable, made explicit
	}
	kc, err := newKubeClient(cfg)
	if err != nil {
		return err
	}
	events, flushEvents := startEvents(ctx, cfg, kc, logger)
	defer flushEvents()
	ln, err := listenHTTP(cfg) // first, so that probes answer while the identity is held elsewhere
	if err != nil {
		return err
	}
	defer ln.Close()
	guard, err := acquireIdentity(ctx, cfg, kc, ln, events, logger) // waits while another process runs this node
	if err != nil && ctx.Err() != nil {
		logger.Info("stopped while waiting for the node identity")
		return nil // a clean stop, as at any later stage
	}
	if err != nil {
		return err
	}
	defer guard.release() // last, whatever stage start-up reached: after the node stopped and the state was flushed
	// Renew from now on, not once start-up is done: the renew deadline
	// counts from the acquisition, and a Lease lost during start-up must
	// stop it. Losing the Lease cancels ctx.
	held, stopRenewing := guard.renew(ctx)
	err = runNode(held, cfg, kc, ln, events, guard, logger)
	if lost := stopRenewing(); lost != nil {
		return lost
	}
	if err != nil && ctx.Err() != nil {
		// Stopped during start-up: whatever stage was cut short, a stop
		// is a clean exit.
		logger.Info("stopped during start-up", "stage", err)
		return nil
	}
	return err
}

// runNode runs the relay's components while this process holds the node
// identity, until ctx is done or a component fails, and stops them all
// before it returns.
func runNode(ctx context.Context, cfg Config, kc *kubeclient.Client, ln net.Listener, events *kubeevents.Recorder, guard *identityGuard, logger *slog.Logger) error {
	// The components, in the order data flows at start.
	store, err := newStateStore(ctx, cfg, kc, events, logger)
	if err != nil {
		return err
	}
	if store != nil {
		// Once the Lease is lost another process may own the Secret:
		// nothing this one still holds may land there.
		store.SetWriteGuard(func() bool { return guard.writeWindow() > 0 })
	}
	defer flushState(store, guard, logger) // after the node stopped, before the identity is released
	st := newStatus(uint16(cfg.RelayServerPort), serviceRef(cfg, kc))
	mtu := newMTUWatcher(st, events, logger)
	node := newAppliance(cfg, applianceDeps{store: asStateStore(store), status: st, events: events, onNetChange: mtu.poke}, logger)
	service, err := newServiceWatch(ctx, cfg, kc, node.foundEndpoints, logger)
	if err != nil {
		return err
	}
	derp, err := derpregion.Setup(ctx, cfg.DERPConfig, node.derpDeps(kc))
	if err != nil {
		return err
	}
	st.setDERP(derp) // its readiness is part of the relay's
	web := newHTTPServer(ln, cfg, st, node, derp, store, logger)
	logger.Info("starting", "hostname", cfg.Hostname, "relayPort", uint16(cfg.RelayServerPort),
		"staticEndpoints", cfg.RelayServerStaticEndpoints.String(), "service", cfg.RelayService,
		"state", stateLocation(cfg), "http", ln.Addr().String())
	mtu.check(ctx) // before /readyz and /metrics answer

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return web.run(gctx) })                                                         // /healthz, /readyz, /metrics
	g.Go(func() error { return persistState(gctx, store, persistCheckInterval, events, logger) })       // failed state writes, again until they land
	g.Go(func() error { return keepStateSecret(gctx, store) })                                          // the state Secret, re-created if deleted
	g.Go(func() error { return mtu.run(gctx) })                                                         // path MTU checks
	g.Go(func() error { return node.run(gctx) })                                                        // tailnet node + reconcile loop
	g.Go(func() error { return service.run(gctx) })                                                     // endpoints from the Service
	g.Go(func() error { return derp.Run(gctx) })                                                        // in-cluster DERP region (TS_DERP_PORT)
	g.Go(func() error { return memtune.ReturnFreeMemory(gctx, memtune.DefaultReturnMemory(), logger) }) // the heap's garbage back to the OS once quiet
	err = g.Wait()
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		err = nil
	}
	logger.Info("stopped")
	return err
}

// newKubeClient returns the Kubernetes client when a setting needs one, or
// nil.
func newKubeClient(cfg Config) (*kubeclient.Client, error) {
	if cfg.KubeSecret == "" && cfg.RelayService == "" {
		return nil, nil
	}
	return kubeclient.New()
}

// startEvents starts posting Events about this pod in the background, if
// there is a pod to post them on. Call flush when Run returns: what is
// queued then (a failed state load, say) gets up to 2 s more.
func startEvents(ctx context.Context, cfg Config, kc *kubeclient.Client, logger *slog.Logger) (events *kubeevents.Recorder, flush func()) {
	if kc != nil && cfg.PodName != "" {
		pod := kubeevents.Pod{Name: cfg.PodName, Namespace: cmp.Or(cfg.PodNamespace, kc.Namespace), UID: cfg.PodUID}
		events = kubeevents.New(kc.Dynamic, pod, logger)
	}
	ectx, stop := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() { events.Run(ectx); close(done) }()
	return events, func() { stop(); <-done }
}

// stateLocation says where the node's identity lives, for the start-up log.
func stateLocation(cfg Config) string {
	if cfg.KubeSecret != "" {
		return "secret/" + cfg.KubeSecret
	}
	return cfg.StateDir
}
