package relay

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"tailscale.com/ipn"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/kubeevents"
	"github.com/tsrelay/tsrelay/kubestate"
)

// newStateStore returns the Kubernetes Secret store when TS_KUBE_SECRET is
// set, or nil, which makes tsnet keep its state in TS_STATE_DIR.
func newStateStore(ctx context.Context, cfg Config, kc *kubeclient.Client, events *kubeevents.Recorder, logger *slog.Logger) (*kubestate.Store, error) {
	if cfg.KubeSecret == "" {
		return nil, nil
	}
	s, err := kubestate.New(ctx, logger, kc.Dynamic, kc.Namespace, cfg.KubeSecret)
	if err != nil {
		err = fmt.Errorf("open state Secret (TS_KUBE_SECRET=%s): %w", cfg.KubeSecret, err)
		if ctx.Err() == nil { // not a stop
			events.Warning("StateLoadFailed", err.Error())
		}
		return nil, err
	}
	events.Normal("StateLoaded", "node state loaded from Secret "+s.Ref())
	s.OnRecreated(func(keys int) {
		events.Warning("StateSecretRecreated", fmt.Sprintf("state Secret %s was deleted while the relay ran; created it again from memory (%d state keys), so the node keeps its identity",
			s.Ref(), keys))
	})
	return s, nil
}

// keepStateSecret re-creates the state Secret at once, from memory, if it
// is deleted while the relay runs (see kubestate.Store.Watch), until ctx is
// done; nothing to do without a Secret store. The store logs it, an Event
// (StateSecretRecreated) says it, and tsrelay_state_secret_recreated_total
// counts it.
func keepStateSecret(ctx context.Context, s *kubestate.Store) error {
	if s == nil {
		return nil
	}
	return s.Watch(ctx)
}

// asStateStore returns s as tsnet's store, or nil (tsnet's files in
// TS_STATE_DIR) when there is no Secret store: a nil *kubestate.Store in
// the interface would not be nil.
func asStateStore(s *kubestate.Store) ipn.StateStore {
	if s == nil {
		return nil
	}
	return s
}

// persistCheckInterval is how often persistState looks whether the
// Secret lacks writes, to report when that starts and ends.
const persistCheckInterval = 5 * time.Second

// persistState writes state that failed to reach the Secret again, with
// backoff, until ctx is done, and, looking every so often, reports once when the Secret starts
// lacking writes (a Warning Event: a restart now would lose them) and once
// when it holds them all again. Nothing to do without a Secret store.
//
// Unpersisted state does not make the relay unready: it still relays, and
// an unready pod would be taken out of the load balancer for a problem the
// API server has, not the relay. /readyz?verbose and
// tsrelay_state_unpersisted_seconds show it instead.
func persistState(ctx context.Context, s *kubestate.Store, every time.Duration, events *kubeevents.Recorder, logger *slog.Logger) error {
	if s == nil {
		return nil
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t := time.NewTicker(every)
	defer t.Stop()
	var reported time.Time // the start of the streak reported, or zero
	for {
		select {
		case err := <-done:
			return err
		case <-t.C:
		}
		since, keys := s.Unpersisted()
		switch {
		case !since.IsZero() && reported.IsZero():
			logger.Warn("node state not in the Secret yet; writing it again until the API server takes it", "secret", s.String(), "since", since, "pendingKeys", keys)
			events.Warning("StateNotPersisted", fmt.Sprintf("state writes to Secret %s failing since %s; a restart now may lose the node identity", s.Ref(), since.Format(time.RFC3339)))
			reported = since
		case since.IsZero() && !reported.IsZero():
			logger.Info("node state in the Secret again", "secret", s.String(), "unpersistedFor", time.Since(reported).Round(time.Second))
			events.Normal("StatePersisted", "state Secret "+s.Ref()+" holds every write again")
			reported = time.Time{}
		}
	}
}

// stateJSON is the state Secret's part of /readyz?verbose; nil without one.
func stateJSON(s *kubestate.Store) *readyz.State {
	if s == nil {
		return nil
	}
	out := &readyz.State{Secret: s.Ref()}
	if since, keys := s.Unpersisted(); !since.IsZero() {
		out.UnpersistedSince, out.PendingKeys = &since, keys
	}
	return out
}
