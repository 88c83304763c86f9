package kubeevents

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
)

// fieldManager names tsrelay in the Events' managedFields.
const fieldManager = "tsrelay"

// maxNameLen is the longest object name the API server takes (a DNS
// subdomain).
const maxNameLen = 253

// Run posts queued Events until ctx is done, then keeps posting for at most
// flushTimeout (2 s) and returns, counting what is left as dropped. Call it
// once, in its own goroutine. On a nil Recorder it returns at once.
func (r *Recorder) Run(ctx context.Context) {
	if r == nil {
		return
	}
	if !r.running.CompareAndSwap(false, true) {
		r.logger.Error("kube events: Run called twice; the second call does nothing")
		return
	}
	// Posts use their own context, cancelled flushTimeout after ctx: by
	// then ctx is done, and a post in flight or an Event recorded on the
	// way down should still get its chance.
	postCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	stop := context.AfterFunc(ctx, func() { time.AfterFunc(flushTimeout, cancel) })
	defer stop()

	for {
		select {
		case <-ctx.Done():
			r.postQueued(postCtx)
			r.stop()
			return
		case <-r.wake:
			r.postQueued(postCtx)
		}
	}
}

// postQueued posts queued Events, oldest first, until the queue is empty or
// ctx is done.
func (r *Recorder) postQueued(ctx context.Context) {
	for ctx.Err() == nil {
		p := r.pop()
		if p == nil {
			return
		}
		r.post(ctx, p)
	}
}

// pop takes the oldest queued Event, or returns nil. Repeats recorded from
// now on are queued anew, to be posted as a patch.
func (r *Recorder) pop() *pending {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.queue) == 0 {
		return nil
	}
	p := r.queue[0]
	r.queue[0] = nil
	r.queue = r.queue[1:]
	delete(r.queued, p.key)
	return p
}

// stop marks the Recorder stopped and drops what is still queued.
func (r *Recorder) stop() {
	r.mu.Lock()
	r.stopped = true
	left := len(r.queue)
	r.queue = nil
	clear(r.queued)
	r.mu.Unlock()
	if left > 0 {
		r.dropped.Add(uint64(left))
		r.logger.Warn("kube events dropped at shutdown", "count", left)
	}
}

// post creates or patches one Event, counts a failure or a drop and logs
// the first failure of a streak.
func (r *Recorder) post(ctx context.Context, p *pending) {
	err := r.createOrPatch(ctx, p)
	if err == nil {
		if r.failing {
			r.failing = false
			r.logger.Info("kube events posted again", "failed_total", r.failed.Load())
		}
		return
	}
	if ctx.Err() != nil {
		// Shutting down and out of time: not a failure of the API server.
		r.dropped.Add(1)
		return
	}
	r.failed.Add(1)
	if r.failing {
		r.logger.Debug("kube event not posted", "type", p.eventType, "reason", p.reason, "err", err)
		return
	}
	r.failing = true
	r.logger.Warn("kube event not posted; further failures are not logged until one succeeds",
		"type", p.eventType, "reason", p.reason, "err", err)
}

// createOrPatch folds p into the Event with the same key if this Recorder
// posted one, and otherwise creates an Event.
func (r *Recorder) createOrPatch(ctx context.Context, p *pending) error {
	if v, ok := r.posted.Get(p.key); ok {
		prev := v.(*postedEvent)
		count := prev.count + p.n
		err := r.withRetry(ctx, func(ctx context.Context) error { return r.patch(ctx, prev.name, count, p.last) })
		if err == nil {
			prev.count = count
			return nil
		}
		if !apierrors.IsNotFound(err) {
			return err
		}
		// Expired (the API server keeps Events for an hour by default) or
		// deleted: start a new Event.
		r.posted.Remove(p.key)
	}
	name := r.newName(p.first)
	tries := 0
	err := r.withRetry(ctx, func(ctx context.Context) error {
		tries++
		err := r.create(ctx, name, p)
		if tries > 1 && apierrors.IsAlreadyExists(err) {
			return nil // the first try landed; only its response was lost
		}
		return err
	})
	if err != nil {
		return err
	}
	// The cache forgets the least recently posted key when full.
	r.posted.Add(p.key, &postedEvent{name: name, count: p.n})
	return nil
}

// withRetry calls f, and once more after retryDelay if the error is one
// that another try may fix. Each call gets postTimeout.
func (r *Recorder) withRetry(ctx context.Context, f func(context.Context) error) error {
	call := func() error {
		ctx, cancel := context.WithTimeout(ctx, postTimeout)
		defer cancel()
		return f(ctx)
	}
	err := call()
	if err == nil || !retryable(err) {
		return err
	}
	select {
	case <-ctx.Done():
		return err
	case <-time.After(r.retryDelay):
	}
	return call()
}

// retryable reports whether err is transient: a timeout, throttling, a
// server error, or no answer at all (a connection error).
func retryable(err error) bool {
	switch {
	case apierrors.IsServerTimeout(err), apierrors.IsTimeout(err), apierrors.IsTooManyRequests(err),
		apierrors.IsInternalError(err), apierrors.IsServiceUnavailable(err), apierrors.IsUnexpectedServerError(err):
		return true
	}
	var status apierrors.APIStatus
	return !errors.As(err, &status)
}

// create creates Event name from p.
func (r *Recorder) create(ctx context.Context, name string, p *pending) error {
	_, err := r.events.Create(ctx, r.newEvent(name, p), metav1.CreateOptions{FieldManager: fieldManager})
	if err != nil {
		return apiError("create", name, err)
	}
	return nil
}

// patch sets the count and lastTimestamp of Event name.
func (r *Recorder) patch(ctx context.Context, name string, count int64, last time.Time) error {
	body, err := json.Marshal(map[string]any{"count": count, "lastTimestamp": timestamp(last)})
	if err != nil {
		return fmt.Errorf("patch event %s: %w", name, err)
	}
	_, err = r.events.Patch(ctx, name, types.MergePatchType, body, metav1.PatchOptions{FieldManager: fieldManager})
	if err != nil {
		return apiError("patch", name, err)
	}
	return nil
}

// newEvent returns the core/v1 Event p, named name, as client-go's recorder
// would build it.
func (r *Recorder) newEvent(name string, p *pending) *unstructured.Unstructured {
	involved := map[string]any{
		"apiVersion": "v1",
		"kind":       "Pod",
		"name":       r.pod.Name,
		"namespace":  r.pod.Namespace,
	}
	if r.pod.UID != "" {
		involved["uid"] = r.pod.UID
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1",
		"kind":       "Event",
		"metadata": map[string]any{
			"name":      name,
			"namespace": r.pod.Namespace,
		},
		"involvedObject":     involved,
		"type":               p.eventType,
		"reason":             p.reason,
		"message":            p.message,
		"source":             map[string]any{"component": component},
		"reportingComponent": component,
		"reportingInstance":  r.pod.Name,
		"firstTimestamp":     timestamp(p.first),
		"lastTimestamp":      timestamp(p.last),
		"count":              p.n,
	}}
}

// newName returns "<pod>.<hex unix nanos of t>", as client-go names Events,
// with the nanos raised if need be so that no two names repeat.
func (r *Recorder) newName(t time.Time) string {
	nanos := max(t.UnixNano(), r.lastNanos+1)
	r.lastNanos = nanos
	suffix := fmt.Sprintf(".%x", nanos)
	prefix := r.pod.Name
	if len(prefix)+len(suffix) > maxNameLen {
		// Cut the pod name, and any '.' or '-' it then ends in, which
		// would not be a valid end of a DNS label.
		prefix = strings.TrimRight(prefix[:maxNameLen-len(suffix)], ".-")
	}
	return prefix + suffix
}

// timestamp formats t as a metav1.Time: RFC 3339, seconds, UTC.
func timestamp(t time.Time) string {
	return t.UTC().Format(time.RFC3339)
}

// apiError describes err from verb on Event name, and says which RBAC verbs
// are needed when the call was forbidden.
func apiError(verb, name string, err error) error {
	if apierrors.IsForbidden(err) {
		return fmt.Errorf("%s event %s: forbidden; %s: %w", verb, name, rbacHint, err)
	}
	return fmt.Errorf("%s event %s: %w", verb, name, err)
}
