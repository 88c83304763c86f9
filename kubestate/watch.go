package kubestate

import (
	"context"
	"fmt"
	"maps"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
)

const (
	// watchTimeout ends each watch of the Secret after this long, so that
	// a connection some middlebox silently dropped is replaced in bounded
	// time; each new watch starts with a GET, which also notices a delete
	// the dropped one missed.
	watchTimeout = 5 * time.Minute
	// checkInterval is how often the Secret is looked at when the Role
	// does not allow watching it (a Role from before the watch was added).
	checkInterval = 30 * time.Second
	// callTimeout bounds each GET and Create the watch loop makes.
	callTimeout = 10 * time.Second
)

// OnRecreated sets f to be called, with the number of state keys written,
// each time the Secret is found deleted and created again from memory. Call
// it before Watch; f must not block.
func (s *Store) OnRecreated(f func(keys int)) {
	s.writeMu.Lock()
	s.onRecreated = f
	s.writeMu.Unlock()
}

// Watch keeps the Secret in existence until ctx is done: if it is deleted
// while the Store runs (by hand, by a cleanup script, by a namespace
// reset), it is created again at once from memory, which holds the whole
// state, so the node's identity survives the next restart. Without this a
// delete would go unnoticed until the next write, and if nothing were
// written before a restart the node would log in as a new node.
//
// It watches the one Secret by name (a fieldSelector on metadata.name,
// which is how RBAC lets a watch be limited to one name: the Role needs
// "watch" on it). Should the Role not allow that, it logs so once and looks
// every 30 s instead. It returns nil when ctx is done.
func (s *Store) Watch(ctx context.Context) error {
	pause := s.retryMin
	polling := false
	for {
		var err error
		if polling {
			err = s.ensure(ctx)
		} else {
			err = s.watchOnce(ctx)
		}
		if ctx.Err() != nil {
			return nil
		}
		wait := pause
		switch {
		case polling:
			wait = checkInterval
		case apierrors.IsForbidden(err):
			polling = true
			wait = checkInterval
			s.logger.Warn("kube state: the Role does not allow watching the state secret; looking for a delete every 30s instead (grant \"watch\" on it)",
				"secret", s.Ref(), "err", err)
		case err != nil:
			s.logger.Debug("kube state: watch of the state secret ended", "secret", s.Ref(), "err", err, "next", pause)
			pause = min(pause*2, retryMax)
		default:
			pause = s.retryMin
			wait = 0
		}
		if wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
	}
}

// watchOnce makes sure the Secret exists, then watches it from the version
// it read until it is deleted (and re-created), the watch ends or ctx is
// done.
func (s *Store) watchOnce(ctx context.Context) error {
	gctx, cancel := context.WithTimeout(ctx, callTimeout)
	obj, err := s.client.Get(gctx, s.name, metav1.GetOptions{})
	cancel()
	if apierrors.IsNotFound(err) {
		return s.recreateLocked(ctx, "found missing")
	}
	if err != nil {
		return fmt.Errorf("get: %w", err)
	}
	timeout := int64(watchTimeout / time.Second)
	w, err := s.client.Watch(ctx, metav1.ListOptions{
		FieldSelector:   fields.OneTermEqualSelector("metadata.name", s.name).String(),
		ResourceVersion: obj.GetResourceVersion(),
		TimeoutSeconds:  &timeout,
	})
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.ResultChan():
			if !ok {
				return nil // ended by the server: watch again
			}
			switch ev.Type {
			case watch.Deleted:
				return s.recreateLocked(ctx, "deleted")
			case watch.Error:
				return fmt.Errorf("watch: %w", apierrors.FromObject(ev.Object))
			}
		}
	}
}

// ensure re-creates the Secret if it is missing: Watch's fallback.
func (s *Store) ensure(ctx context.Context) error {
	gctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	_, err := s.client.Get(gctx, s.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return s.recreateLocked(ctx, "found missing")
	}
	return err
}

// recreateLocked is recreate for callers that do not hold writeMu.
func (s *Store) recreateLocked(ctx context.Context, how string) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	return s.recreate(ctx, how)
}

// recreate creates the Secret again from memory: the last seen Secret's
// data (other keys included) with pending writes laid over it. If someone
// created a Secret of that name meanwhile, memory is written over its
// state keys and its other keys are kept. Callers hold writeMu.
func (s *Store) recreate(ctx context.Context, how string) error {
	if s.mayWrite != nil && !s.mayWrite() {
		return errFenced
	}
	data, err := secretData(s.secret)
	if err != nil {
		return err
	}
	for k, p := range s.pending {
		if p.deleted {
			delete(data, k)
		} else {
			data[k] = p.value
		}
	}
	obj := s.newSecret()
	if err := setSecretData(obj, data); err != nil {
		return err
	}
	created, err := s.client.Create(ctx, obj, metav1.CreateOptions{FieldManager: fieldManager})
	if apierrors.IsAlreadyExists(err) {
		// Someone was quicker (a restore from backup, say): keep what
		// they wrote beside the state, and the state as memory has it.
		// Any other change on the Secret would be visible to commit
		// as a conflict; this one is just another version.
		fresh, gerr := s.client.Get(ctx, s.name, metav1.GetOptions{})
		if gerr != nil {
			return s.apiError("get", gerr)
		}
		s.secret = fresh
		err = s.commit(ctx, func(d map[string][]byte) { maps.Copy(d, data) })
		if err != nil {
			return fmt.Errorf("re-create: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("re-create: %w", s.apiError("create", err))
	} else if _, err := s.adopt(created); err != nil {
		return err
	}
	clear(s.pending)
	s.since = time.Time{}
	s.syncMem()
	s.recreated.Add(1)
	keys := 0
	for k := range data {
		if _, ok := decodeKey(k); ok {
			keys++
		}
	}
	s.logger.Warn("kube state secret was deleted; created it again from memory", "secret", s.Ref(), "how", how, "keys", keys)
	if s.onRecreated != nil {
		s.onRecreated(keys)
	}
	return nil
}
