// Package relay is the tsrelay appliance: a userspace Tailscale node (tsnet)
// that turns itself into a peer relay at startup, keeps the relay settings in
// force while it runs, and reports honestly over HTTP whether it is relaying.
package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
	"tailscale.com/feature"
	"tailscale.com/ipn"
	"tailscale.com/tsnet"

	"github.com/tsrelay/tsrelay/internal/httpserve"
	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/kubeevents"
	"github.com/tsrelay/tsrelay/kubestate"
	"github.com/tsrelay/tsrelay/lbaddr"

	// tsnet does not link the peer relay server. Without this import,
	// RelayServerPort is still accepted and advertised, so peers keep trying
	// the relay, but nothing listens. Run refuses to start without it.
	_ "tailscale.com/feature/relayserver"
)

// relayFeature is the name the relay server registers with tailscale.com/feature.
const relayFeature = "relayserver"

// Timings of the reconcile loop.
const (
	// resyncInterval bounds how long a drifted pref or a lost relay socket
	// goes unnoticed when no IPN bus event announces it.
	resyncInterval = 10 * time.Second
	// bindTimeout is how long the relay server gets to bind its socket
	// after the prefs are applied; it binds synchronously in practice.
	bindTimeout = 5 * time.Second
)

// Run runs the relay until ctx is done or a stage fails. It returns nil after
// a clean shutdown.
func Run(ctx context.Context, cfg Config, logger *slog.Logger) error {
	if !feature.IsRegistered(relayFeature) {
		return errors.New("this binary was built without tailscale.com/feature/relayserver; it cannot relay")
	}
	var kc *kubeclient.Client
	if cfg.KubeSecret != "" || cfg.RelayService != "" {
		var err error
		if kc, err = kubeclient.New(); err != nil {
			return err
		}
	}
	// Events about this pod, posted in the background; what is queued when
	// Run returns (a failed state load, say) gets up to 2 s more.
	var events *kubeevents.Recorder
	if kc != nil && cfg.PodName != "" {
		events = kubeevents.New(kc.Dynamic, kubeevents.Pod{Name: cfg.PodName, Namespace: cmp.Or(cfg.PodNamespace, kc.Namespace), UID: cfg.PodUID}, "tsrelay", logger)
	}
	eventsCtx, stopEvents := context.WithCancel(context.WithoutCancel(ctx))
	eventsDone := make(chan struct{})
	go func() { events.Run(eventsCtx); close(eventsDone) }()
	defer func() { stopEvents(); <-eventsDone }()

	ln, err := net.Listen("tcp", cfg.LocalAddrPort)
	if err != nil {
		return fmt.Errorf("listen on TS_LOCAL_ADDR_PORT=%s: %w", cfg.LocalAddrPort, err)
	}
	defer ln.Close()
	// Before the state is even read: another process may run it.
	guard, err := acquireIdentity(ctx, cfg, kc, ln, events, logger)
	if err != nil {
		return err
	}
	defer guard.release()
	store, err := newStateStore(ctx, cfg, kc, logger)
	if err != nil {
		events.Warning("StateLoadFailed", err.Error())
		return err
	}
	if s, ok := store.(*kubestate.Store); ok {
		events.Normal("StateLoaded", "node state loaded from Secret "+strings.TrimPrefix(s.String(), "kube:"))
		defer flushState(s, logger) // before the release: deferred later
	}

	a := newAppliance(cfg, store, logger)
	a.events = events
	var svc *lbaddr.Config
	if cfg.RelayService != "" {
		svc = &lbaddr.Config{
			Client:    kc.Dynamic,
			Namespace: kc.Namespace,
			Name:      cfg.RelayService,
			RelayPort: uint16(cfg.RelayServerPort),
			Logger:    logger,
			OnChange:  a.setFound,
		}
		a.status.followService(kc.Namespace + "/" + cfg.RelayService)
		if err := lbaddr.Check(ctx, *svc); err != nil {
			ln.Close()
			return fmt.Errorf("follow TS_RELAY_SERVICE=%s: %w", cfg.RelayService, err)
		}
	}
	logger.Info("starting", "hostname", cfg.Hostname, "relayPort", uint16(cfg.RelayServerPort),
		"staticEndpoints", cfg.RelayServerStaticEndpoints.String(), "service", cfg.RelayService,
		"state", stateLocation(cfg), "http", ln.Addr().String())

	// Checked before /readyz and /metrics answer, so that they never show
	// an unchecked path; a check is two netlink round trips.
	a.checkPathMTU(ctx)

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return serveHTTP(gctx, ln, a.handler(), logger) })
	g.Go(func() error { return a.watchPathMTU(gctx) })
	g.Go(func() error { return guard.hold(gctx) })
	if s, ok := store.(*kubestate.Store); ok {
		g.Go(func() error { return s.Run(gctx) })
	}
	g.Go(func() error {
		defer a.closeTailnet()
		return a.run(gctx)
	})
	if svc != nil {
		g.Go(func() error { return lbaddr.Watch(gctx, *svc) })
	}
	err = g.Wait()
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		err = nil
	}
	logger.Info("stopped")
	return err
}

// newStateStore returns the Kubernetes Secret store when TS_KUBE_SECRET is
// set, or nil, which makes tsnet keep its state in TS_STATE_DIR.
func newStateStore(ctx context.Context, cfg Config, kc *kubeclient.Client, logger *slog.Logger) (ipn.StateStore, error) {
	if cfg.KubeSecret == "" {
		return nil, nil
	}
	s, err := kubestate.New(ctx, logger, kc.Dynamic, kc.Namespace, cfg.KubeSecret)
	if err != nil {
		return nil, fmt.Errorf("open state Secret (TS_KUBE_SECRET=%s): %w", cfg.KubeSecret, err)
	}
	return s, nil
}

// stateLocation says where the node's identity lives, for the start-up log.
func stateLocation(cfg Config) string {
	if cfg.KubeSecret != "" {
		return "secret/" + cfg.KubeSecret
	}
	return cfg.StateDir
}

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
	s := &tsnet.Server{
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
	return s
}

// serveHTTP serves h on ln until ctx is done, then drains requests, with
// the limits that keep abuse of the port from exhausting memory.
func serveHTTP(ctx context.Context, ln net.Listener, h http.Handler, logger *slog.Logger) error {
	return httpserve.Serve(ctx, ln, h, logger)
}
