// Package relay is the tsrelay appliance: a userspace Tailscale node (tsnet)
// that turns itself into a peer relay at startup, keeps the relay settings in
// force while it runs, and reports honestly over HTTP whether it is relaying.
package relay

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
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
	st := newStatus(uint16(cfg.RelayServerPort), serviceRef(cfg, kc))
	guard, err := newIdentityGuard(cfg, kc, st, events, logger) // st says this process waits for the identity, until it holds it
	if err != nil {
		return err
	}
	web, err := newHTTPServer(cfg, st, logger)
	if err != nil {
		return err
	}
	// One HTTP server for the whole run, so that the probes answer while
	// another process holds the identity; it stops once the node has.
	g, gctx := errgroup.WithContext(ctx)
	serving, stopServing := context.WithCancel(gctx)
	g.Go(func() error { return web.run(serving) }) // /healthz, /readyz, /metrics
	g.Go(func() error {
		defer stopServing()
		return guard.hold(gctx, func(held context.Context) error { // waits while another process runs this node
			return runNode(held, cfg, kc, st, web, events, guard, logger)
		})
	})
	return g.Wait()
}

// runNode runs the relay's components while this process holds the node
// identity, until ctx is done or a component fails, and stops them all
// before it returns. web answers from them once they are built.
func runNode(ctx context.Context, cfg Config, kc *kubeclient.Client, st *status, web *httpServer, events *kubeevents.Recorder, guard *identityGuard, logger *slog.Logger) error {
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
	mtu := newMTUWatcher(st, events, logger)
	node := newTailnetNode(cfg, tailnetNodeDeps{store: asStateStore(store), status: st, events: events, onNetChange: mtu.poke}, logger)
	service, err := newServiceWatch(ctx, cfg, kc, node.foundEndpoints, logger)
	if err != nil {
		return err
	}
	derp, err := derpregion.Setup(ctx, cfg.DERPConfig, node.derpDeps(kc))
	if err != nil {
		return err
	}
	st.setDERP(derp) // its readiness is part of the relay's
	web.serveNode(&nodeParts{node: node, derp: derp, store: store})
	logger.Info("starting", "hostname", cfg.Hostname, "relayPort", uint16(cfg.RelayServerPort),
		"staticEndpoints", cfg.RelayServerStaticEndpoints.String(), "service", cfg.RelayService,
		"state", stateLocation(cfg), "http", web.ln.Addr().String())
	mtu.check(ctx) // before the node starts

	g, gctx := errgroup.WithContext(ctx)
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
