package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tsrelay/tsrelay/internal/httpserve"
	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/kubeevents"
	"github.com/tsrelay/tsrelay/kubestate"
	"github.com/tsrelay/tsrelay/lease"
)

// releaseTimeout bounds the last API calls on shutdown: the final state
// write and the Lease release. Kubernetes allows 30 s after SIGTERM.
const releaseTimeout = 5 * time.Second

// identityGuard makes sure that no other process runs this node identity
// while this one does: the Lease named after TS_KUBE_SECRET, or a lock on
// TS_STATE_DIR.
type identityGuard struct {
	lease  *lease.Lease
	dir    *lease.DirLock
	logger *slog.Logger
}

// acquireIdentity waits until this process may run the node identity. It
// returns before the node starts; while another process holds the identity
// it logs who and until when, records a Warning Event once per holder, and
// serves ln: /healthz 200, so the probes do not restart a pod that only
// waits, and /readyz 503 saying who holds the identity.
func acquireIdentity(ctx context.Context, cfg Config, kc *kubeclient.Client, ln net.Listener, events *kubeevents.Recorder, logger *slog.Logger) (*identityGuard, error) {
	id := holderIdentity(cfg)
	g := &identityGuard{logger: logger}
	var waitingOn atomic.Pointer[string]
	state := cfg.StateDir
	if cfg.KubeSecret != "" {
		state = kc.Namespace + "/" + cfg.KubeSecret
	}
	stop := serveWhileWaiting(ln, waitingIdentity{hostname: cfg.Hostname, state: state}, func() string {
		if h := waitingOn.Load(); h != nil {
			return *h
		}
		return "not yet known"
	}, logger)
	defer stop()
	if cfg.KubeSecret == "" {
		d, err := lease.LockDir(ctx, cfg.StateDir, id, logger, func(holder string) {
			msg := "process " + holder + " (state directory lock)"
			waitingOn.Store(&msg)
			events.Warning("IdentityHeldElsewhere", fmt.Sprintf("state directory %s is locked by %s; waiting", cfg.StateDir, holder))
		})
		if err != nil {
			return nil, fmt.Errorf("lock TS_STATE_DIR=%s: %w", cfg.StateDir, err)
		}
		g.dir = d
		return g, nil
	}
	l, err := lease.New(lease.Config{
		Client:    kc.Dynamic,
		Namespace: kc.Namespace,
		Name:      cfg.KubeSecret,
		Identity:  id,
		Duration:  cfg.LeaseDuration,
		Logger:    logger,
		OnChange: func(st lease.Status) {
			if !st.Held && st.Holder != "" && st.Holder != id {
				msg := fmt.Sprintf("%s (Lease %s/%s), renewed %s; taken over at %s unless renewed or released",
					st.Holder, kc.Namespace, cfg.KubeSecret, st.RenewTime.Format(time.RFC3339), st.Expires.Format(time.RFC3339))
				waitingOn.Store(&msg)
				events.Warning("IdentityHeldElsewhere", fmt.Sprintf("the node identity in Secret %s is held by %s (Lease %s, renewed %s); waiting until it is released or expires at %s",
					cfg.KubeSecret, st.Holder, cfg.KubeSecret, st.RenewTime.Format(time.RFC3339), st.Expires.Format(time.RFC3339)))
			}
		},
	})
	if err != nil {
		return nil, err
	}
	g.lease = l
	if err := l.Acquire(ctx); err != nil {
		// Stopped while acquiring: a write whose answer the stop cut
		// off may have made this process the holder all the same.
		g.release()
		return nil, err
	}
	return g, nil
}

// waitingIdentity is the identity a waiting process reports in
// tsrelay_identity_info.
type waitingIdentity struct{ hostname, state string }

// serveWhileWaiting answers on ln until stop is called, on a duplicate of
// its socket, so that stopping closes only the duplicate and ln serves on.
// If the socket cannot be duplicated, nothing is served meanwhile.
func serveWhileWaiting(ln net.Listener, id waitingIdentity, holder func() string, logger *slog.Logger) (stop func()) {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return func() {}
	}
	f, err := tl.File()
	if err != nil {
		logger.Warn("cannot serve /healthz while waiting for the identity", "err", err)
		return func() {}
	}
	dup, err := net.FileListener(f)
	f.Close()
	if err != nil {
		logger.Warn("cannot serve /healthz while waiting for the identity", "err", err)
		return func() {}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "waiting for the node identity, held by "+holder(), http.StatusServiceUnavailable)
	})
	// The same series the full /metrics has (metrics.go), so that a relay
	// stuck waiting shows on a dashboard and in alerts.
	reg := prometheus.NewRegistry()
	gauge := func(name, help string, v float64, labels prometheus.Labels) {
		g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "tsrelay_" + name, Help: help, ConstLabels: labels})
		g.Set(v)
		reg.MustRegister(g)
	}
	gauge("ready", readyHelp, 0, nil)
	gauge("identity_waiting", identityWaitingHelp, 1, nil)
	gauge("identity_info", identityInfoHelp, 1, prometheus.Labels{"hostname": id.hostname, "state": id.state, "dns_name": ""})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { httpserve.Serve(ctx, dup, mux, logger); close(done) }()
	return func() { cancel(); <-done }
}

// renew renews the Lease in the background from now on, until stop is
// called; without a Lease there is nothing to renew. If the Lease is lost,
// the returned context is cancelled with the reason, so that whatever stage
// the relay is in stops, and stop returns that reason.
func (g *identityGuard) renew(parent context.Context) (ctx context.Context, stop func() error) {
	ctx, cancel := context.WithCancelCause(parent)
	if g.lease == nil {
		return ctx, func() error { cancel(nil); return nil }
	}
	hctx, hcancel := context.WithCancel(parent)
	done := make(chan error, 1)
	go func() {
		err := g.lease.Hold(hctx)
		if err != nil {
			cancel(err)
		}
		done <- err
	}()
	return ctx, func() error {
		hcancel()
		err := <-done
		cancel(nil)
		return err
	}
}

// release gives the identity up, after the node has stopped.
func (g *identityGuard) release() {
	if g.dir != nil {
		if err := g.dir.Unlock(); err != nil {
			g.logger.Warn("unlock state directory", "err", err)
		}
		return
	}
	// The run's context is done by now; the release needs its own.
	ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
	defer cancel()
	if err := g.lease.Release(ctx); err != nil {
		g.logger.Warn("release lease; the next process waits for it to expire", "err", err, "after", g.lease.Duration())
	}
}

// writeWindow is how long this process may still write the node's state:
// until its renew deadline while it holds the Lease, never once it has
// lost it (another process may own the Secret then), and a few seconds
// with a state directory, whose lock cannot be lost.
func (g *identityGuard) writeWindow() time.Duration {
	if g.lease == nil {
		return releaseTimeout
	}
	st := g.lease.Status()
	if !st.Held {
		return 0
	}
	return min(releaseTimeout, time.Until(st.Expires))
}

// flushState makes the last try to write state still pending, after the
// node has stopped, while this process still holds the identity; nothing
// to do without a Secret store.
func flushState(s *kubestate.Store, g *identityGuard, logger *slog.Logger) {
	if s == nil {
		return
	}
	window := g.writeWindow()
	if window <= 0 {
		if _, keys := s.Unpersisted(); keys > 0 {
			logger.Error("state not persisted at shutdown: the Lease is lost, so another process may own the Secret now; not writing it", "pendingKeys", keys)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), window)
	defer cancel()
	if err := s.Flush(ctx); err != nil {
		logger.Error("state not persisted at shutdown", "err", err)
	}
}

// holderIdentity names this process in the Lease: the pod, so that a
// container restarted in the same pod takes its own Lease back at once, or
// else the host and a random suffix, unique to the process.
func holderIdentity(cfg Config) string {
	if cfg.PodName != "" && cfg.PodUID != "" {
		return cfg.PodName + "_" + cfg.PodUID
	}
	host, _ := os.Hostname()
	if cfg.PodName != "" {
		host = cfg.PodName
	}
	suffix := make([]byte, 4)
	rand.Read(suffix)
	return host + "_" + hex.EncodeToString(suffix)
}
