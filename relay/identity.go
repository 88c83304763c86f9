package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"time"

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
// TS_STATE_DIR. It writes the identity's part of the status: until this
// process holds the identity, that it waits, and for whom.
type identityGuard struct {
	lease  *lease.Lease   // with TS_KUBE_SECRET
	dir    *lease.DirLock // without: the state directory's lock, once held
	state  string         // the Secret as namespace/name, or TS_STATE_DIR
	holder string         // this process, as the identity's holder
	status *status
	events *kubeevents.Recorder
	logger *slog.Logger
}

// newIdentityGuard returns the guard of the node identity cfg names; from
// now until it holds the identity, st says that this process waits for it.
func newIdentityGuard(cfg Config, kc *kubeclient.Client, st *status, events *kubeevents.Recorder, logger *slog.Logger) (*identityGuard, error) {
	g := &identityGuard{state: cfg.StateDir, holder: holderIdentity(cfg), status: st, events: events, logger: logger}
	if cfg.KubeSecret != "" {
		g.state = kc.Namespace + "/" + cfg.KubeSecret
		l, err := lease.New(lease.Config{
			Client:    kc.Dynamic,
			Namespace: kc.Namespace,
			Name:      cfg.KubeSecret,
			Identity:  g.holder,
			Duration:  cfg.LeaseDuration,
			Logger:    logger,
			OnChange: func(ls lease.Status) {
				if !ls.Held && ls.Holder != "" && ls.Holder != g.holder {
					renewed, expires := ls.RenewTime.Format(time.RFC3339), ls.Expires.Format(time.RFC3339)
					g.heldElsewhere(fmt.Sprintf("%s (Lease %s), renewed %s; taken over at %s unless renewed or released", ls.Holder, g.state, renewed, expires),
						fmt.Sprintf("the node identity in Secret %s is held by %s (Lease %s, renewed %s); waiting until it is released or expires at %s",
							cfg.KubeSecret, ls.Holder, cfg.KubeSecret, renewed, expires))
				}
			},
		})
		if err != nil {
			return nil, err
		}
		g.lease = l
	}
	st.setIdentity(identityView{state: g.state, waiting: true})
	return g, nil
}

// heldElsewhere says who holds the identity while this process waits: in
// the status (/readyz) and, once per holder, in a Warning Event.
func (g *identityGuard) heldElsewhere(holder, event string) {
	g.status.setIdentityHolder(holder)
	g.events.Warning("IdentityHeldElsewhere", event)
}

// acquire waits until this process may run the node identity. It returns
// before the node starts; while another process holds the identity, the
// status says who and until when.
func (g *identityGuard) acquire(ctx context.Context) error {
	if g.lease == nil {
		d, err := lease.LockDir(ctx, g.state, g.holder, g.logger, func(holder string) {
			g.heldElsewhere("process "+holder+" (state directory lock)", fmt.Sprintf("state directory %s is locked by %s; waiting", g.state, holder))
		})
		if err != nil {
			return fmt.Errorf("lock TS_STATE_DIR=%s: %w", g.state, err)
		}
		g.dir = d
	} else if err := g.lease.Acquire(ctx); err != nil {
		// Stopped while acquiring: a write whose answer the stop cut
		// off may have made this process the holder all the same.
		g.release()
		return err
	}
	g.status.setIdentity(identityView{state: g.state})
	return nil
}

// hold waits for the node identity, runs f while this process holds it,
// and releases it once f has returned. A stop (ctx done) at any stage is a
// clean exit; a lost Lease stops f and is the error.
func (g *identityGuard) hold(ctx context.Context, f func(context.Context) error) error {
	if err := g.acquire(ctx); err != nil {
		if ctx.Err() != nil {
			g.logger.Info("stopped while waiting for the node identity")
			return nil
		}
		return err
	}
	defer g.release() // whatever stage f reached: after the node stopped and the state was flushed
	// Renew from now on, not once start-up is done: the renew deadline
	// counts from the acquisition, and a Lease lost during start-up must
	// stop it. Losing the Lease cancels ctx.
	held, stopRenewing := g.renew(ctx)
	err := f(held)
	if lost := stopRenewing(); lost != nil {
		return lost
	}
	if err != nil && ctx.Err() != nil {
		// Stopped during start-up: whatever stage was cut short, a stop
		// is a clean exit.
		g.logger.Info("stopped during start-up", "stage", err)
		return nil
	}
	return err
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
