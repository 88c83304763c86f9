// Package lease makes sure at most one process runs a node identity at a
// time: with a Kubernetes store, through a coordination.k8s.io/v1 Lease named
// after the state Secret; with a state directory, through an exclusive lock
// on a file in that directory (see LockDir).
//
// The guarantee: a process runs its node only between Acquire returning and
// Hold returning, and two processes that follow this protocol on one Lease
// never do so at the same time, provided each stops its node within
// Duration-RenewDeadline (15 s by default) of Hold returning an error. A
// holder renews every RetryPeriod; one that has not renewed for
// RenewDeadline gives up (Hold returns an error, and the caller must stop
// its node and exit). A contender takes the Lease over only after it has
// seen the same, unrenewed record for the record's whole lease duration,
// measured on its own clock; so clock skew between machines does not matter,
// only a difference in clock rate, which is far below the margin.
//
// The margin holds however slow the API server answers, as in client-go:
// the holder counts RenewDeadline from when its last successful renewal was
// sent, on a timer that fires on time even while an attempt hangs; a
// contender counts Duration from when the answer showing the record
// arrived. Any time a request spends in flight only widens the gap. A holder
// that shuts down cleanly releases the Lease (Release), so that the next
// process takes it at once rather than after the lease duration.
//
// This is the protocol of client-go's tools/leaderelection, written again
// over the dynamic client: that package's resourcelock links client-go's
// typed core/v1 and coordination/v1 clients, which cost about 19 MB of
// stripped binary (DESIGN.md), far more than the binary's 30 MB budget
// leaves (cmd/relay's size test holds it). It also keeps this
// package's record to the Lease's own fields, with no annotations.
package lease

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/clock"
)

// The default timings. An ordinary API-server restart (a kubeadm static pod
// being replaced, a managed control plane's upgrade, an etcd leader change)
// leaves the API server unanswering for tens of seconds, and while it does
// nobody can take the Lease over anyway; a holder gives up its node only
// after RenewDeadline without a renewal, so such a restart costs nothing:
// 75 s covers the longest outage measured against a relay (74 s, issue 17)
// with a few renewals to spare. The 15 s between RenewDeadline and Duration
// is the time the holder has to stop its node before a contender may start
// one. The price is the takeover time after a holder dies without releasing
// (kill -9, a lost node): up to Duration plus RetryPeriod, about 95 s. A
// clean shutdown releases the Lease, and a container restarted in the same
// pod keeps the holder identity (the relay uses the pod's UID), so neither
// waits.
const (
	DefaultDuration      = 90 * time.Second
	DefaultRenewDeadline = 75 * time.Second
	DefaultRetryPeriod   = 5 * time.Second
)

// maxDuration is the longest duration a Lease can store: its
// leaseDurationSeconds is a 32-bit integer.
const maxDuration = math.MaxInt32 * time.Second

// fieldManager names tsrelay in the Lease's managedFields.
const fieldManager = "tsrelay"

// rbacHint says what the Role must grant when a call is forbidden.
const rbacHint = `the Role needs verbs "get" and "update" on this Lease (coordination.k8s.io leases, by name), and "create" on leases unless the Lease already exists`

// Config says which Lease to hold, as whom, and with what timings.
type Config struct {
	// Client reaches the API server (see internal/kubeclient).
	Client dynamic.Interface
	// Namespace and Name name the Lease; the relay uses its state
	// Secret's.
	Namespace, Name string
	// Identity is written into the Lease as its holder. It must be unique
	// to the process or, in a pod, to the pod (a container restarted in
	// the same pod may take its own Lease back at once).
	Identity string
	// Duration is how long a contender waits, after it last saw the
	// Lease change, before it takes it over. Whole seconds (the Lease
	// stores seconds); zero means DefaultDuration.
	Duration time.Duration
	// RenewDeadline is how long a holder keeps its node without a
	// successful renewal; it must be under Duration. Zero means
	// DefaultRenewDeadline, or 5/6 of Duration when Duration is set.
	RenewDeadline time.Duration
	// RetryPeriod is the pause between renewals and between a
	// contender's looks at the Lease; it must be under RenewDeadline.
	// Zero means DefaultRetryPeriod, or Duration/18 when Duration is set.
	RetryPeriod time.Duration
	// Clock is the time source; nil means the real clock. Tests pass a
	// fake one.
	Clock clock.WithTicker
	// Logger gets one line per transition; nil discards.
	Logger *slog.Logger
	// OnChange, if set, is called with the new Status each time this
	// process starts waiting on a holder, sees the holder change,
	// acquires, loses or releases the Lease. It must not block.
	OnChange func(Status)
}

// Status is what a process knows of the Lease.
type Status struct {
	// Held reports whether this process holds the Lease.
	Held bool
	// Holder is the Lease's holder identity as last read ("" when free
	// or not read yet).
	Holder string
	// RenewTime is when the holder last renewed, by the holder's clock.
	RenewTime time.Time
	// Expires is, for a contender, when it will take the Lease over if
	// the holder does not renew (this process's clock); for the holder,
	// when it will give up its node if renewals keep failing.
	Expires time.Time
}

// Lease is one process's side of the protocol. Call Acquire, then Hold,
// then Release; Status may be called at any time from any goroutine.
type Lease struct {
	cfg    Config
	client dynamic.ResourceInterface
	clock  clock.WithTicker
	logger *slog.Logger

	mu       sync.Mutex
	status   Status
	observed record    // the record as last read or written
	seenAt   time.Time // when observed last changed, by c.clock
	// renewedAt is when the last successful renewal was sent.
	renewedAt time.Time
	// wrote is set once this process has sent a write that names it the
	// holder: one whose answer was lost (a cancelled Acquire) may still
	// have landed, so Release must look.
	wrote bool
}

// record is the part of a Lease's spec the protocol reads and writes.
type record struct {
	holder       string
	duration     time.Duration
	acquireTime  string
	renewTime    string
	transitions  int64
	resourceVers string
}

// sameRecord reports whether a and b are the same record, ignoring the
// resourceVersion (which any metadata change moves).
func sameRecord(a, b record) bool {
	a.resourceVers, b.resourceVers = "", ""
	return a == b
}

// New checks cfg and returns a Lease. It contacts nothing.
func New(cfg Config) (*Lease, error) {
	if cfg.Client == nil {
		return nil, errors.New("lease: no Kubernetes client")
	}
	if cfg.Name == "" || cfg.Namespace == "" {
		return nil, fmt.Errorf("lease: namespace %q and name %q must both be set", cfg.Namespace, cfg.Name)
	}
	if cfg.Identity == "" {
		return nil, errors.New("lease: empty holder identity")
	}
	if cfg.Duration == 0 {
		cfg.Duration = DefaultDuration
		if cfg.RenewDeadline == 0 {
			cfg.RenewDeadline = DefaultRenewDeadline
		}
		if cfg.RetryPeriod == 0 {
			cfg.RetryPeriod = DefaultRetryPeriod
		}
	}
	if cfg.RenewDeadline == 0 {
		cfg.RenewDeadline = cfg.Duration * 5 / 6
	}
	if cfg.RetryPeriod == 0 {
		cfg.RetryPeriod = cfg.Duration / 18
	}
	switch {
	case cfg.Duration < time.Second || cfg.Duration%time.Second != 0 || cfg.Duration > maxDuration:
		return nil, fmt.Errorf("lease: duration %v must be a whole number of seconds from 1s to %v", cfg.Duration, maxDuration)
	case cfg.RenewDeadline >= cfg.Duration:
		return nil, fmt.Errorf("lease: renew deadline %v must be under the duration %v, leaving the holder time to stop", cfg.RenewDeadline, cfg.Duration)
	case cfg.RetryPeriod <= 0 || cfg.RetryPeriod >= cfg.RenewDeadline:
		return nil, fmt.Errorf("lease: retry period %v must be positive and under the renew deadline %v", cfg.RetryPeriod, cfg.RenewDeadline)
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Lease{
		cfg:    cfg,
		client: cfg.Client.Resource(leasesResource()).Namespace(cfg.Namespace),
		clock:  cfg.Clock,
		logger: cfg.Logger.With("lease", cfg.Namespace+"/"+cfg.Name),
	}, nil
}

// Status returns what this process knows of the Lease now.
func (l *Lease) Status() Status {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.status
}

// Duration returns the lease duration in use (defaults applied).
func (l *Lease) Duration() time.Duration { return l.cfg.Duration }

// Acquire returns once this process holds the Lease, creating it if it does
// not exist, or when ctx is done. While another process holds it, Acquire
// waits, looking again every RetryPeriod, and Status says who holds it and
// when it will be taken over. API errors are logged and retried, except a
// refusal by RBAC, which is returned: waiting would not fix it.
func (l *Lease) Acquire(ctx context.Context) error {
	for {
		held, err := l.tryAcquireOrRenew(ctx)
		if held {
			return nil
		}
		if apierrors.IsForbidden(err) {
			return fmt.Errorf("lease %s/%s: forbidden; %s: %w", l.cfg.Namespace, l.cfg.Name, rbacHint, err)
		}
		if err != nil {
			l.logger.Warn("lease: cannot read or take the lease; retrying", "err", err, "retry", l.cfg.RetryPeriod)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lease %s/%s: acquire: %w", l.cfg.Namespace, l.cfg.Name, context.Cause(ctx))
		case <-l.clock.After(l.cfg.RetryPeriod):
		}
	}
}

// Hold renews the Lease every RetryPeriod until ctx is done, then returns
// nil without releasing it (call Release). Call it as soon as Acquire
// returns: the renew deadline counts from the last renewal, Acquire's
// included. It returns an error when the Lease has not been renewed for
// RenewDeadline, or when another process holds it: the caller must then
// stop its node at once, since after Duration another process may start
// one.
//
// The renew deadline is a timer of its own, as client-go bounds its renew
// loop with a RenewDeadline context: it fires on time however long a
// renewal attempt takes, and an attempt still in flight then is abandoned.
// A renewal counts from when it was sent, not when it was answered, so the
// holder's deadline never runs behind any contender's countdown.
func (l *Lease) Hold(ctx context.Context) error {
	deadline := l.clock.NewTimer(l.untilDeadline())
	defer deadline.Stop()
	pause := l.clock.NewTimer(l.cfg.RetryPeriod)
	defer pause.Stop()
	var lastErr error
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-deadline.C():
			return l.deadlinePassed(lastErr)
		case <-pause.C():
		}
		attemptCtx, cancel := context.WithCancel(ctx)
		result := make(chan attempt, 1)
		go func() {
			held, err := l.tryAcquireOrRenew(attemptCtx)
			result <- attempt{held, err}
		}()
		var r attempt
		select {
		case r = <-result:
			cancel()
		case <-deadline.C():
			cancel()
			<-result // a renewal landing now must not count: this process gives up
			return l.deadlinePassed(cmp.Or(lastErr, errors.New("renewal still unanswered")))
		}
		pause.Reset(l.cfg.RetryPeriod)
		if r.held {
			lastErr = nil
			if !deadline.Stop() {
				select {
				case <-deadline.C():
				default:
				}
			}
			deadline.Reset(l.untilDeadline())
			continue
		}
		if ctx.Err() != nil {
			return nil
		}
		l.mu.Lock()
		holder, since := l.status.Holder, l.clock.Since(l.renewedAt)
		l.mu.Unlock()
		if r.err == nil && holder != l.cfg.Identity {
			l.lost(holder)
			return fmt.Errorf("lease %s/%s: now held by %q; this process must stop its node", l.cfg.Namespace, l.cfg.Name, holder)
		}
		lastErr = r.err
		l.logger.Warn("lease: renewal failed; retrying", "err", r.err, "since_renewed", since.Round(time.Second), "gives_up_after", l.cfg.RenewDeadline)
	}
}

// attempt is the result of one tryAcquireOrRenew.
type attempt struct {
	held bool
	err  error
}

// untilDeadline is how long this process may keep its node without another
// renewal: RenewDeadline after the last renewal was sent.
func (l *Lease) untilDeadline() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.renewedAt.Add(l.cfg.RenewDeadline).Sub(l.clock.Now())
}

// deadlinePassed records that the renew deadline passed and returns Hold's
// error; err is the last renewal's failure, if any.
func (l *Lease) deadlinePassed(err error) error {
	l.mu.Lock()
	since := l.clock.Since(l.renewedAt)
	l.mu.Unlock()
	l.lost("")
	return fmt.Errorf("lease %s/%s: not renewed for %v (renew deadline %v), so another process may take the identity after %v; stopping: %w",
		l.cfg.Namespace, l.cfg.Name, since.Round(time.Millisecond), l.cfg.RenewDeadline, l.cfg.Duration, cmp.Or(err, errors.New("no answer")))
}

// lost records that this process no longer holds the Lease.
func (l *Lease) lost(holder string) {
	l.mu.Lock()
	l.status.Held = false
	l.status.Holder = holder
	st := l.status
	l.mu.Unlock()
	l.logger.Error("lease lost", "holder", holder)
	l.notify(st)
}

// Release gives the Lease up if this process holds it, so that the next
// process may take it at once. Call it after the node has stopped, with a
// context of its own (the one Hold ran under is done by then). Call it too
// when Acquire returned an error: a write whose answer was cut off by the
// cancellation may have made this process the holder all the same, and
// Release clears the Lease if it names this process.
func (l *Lease) Release(ctx context.Context) error {
	l.mu.Lock()
	held, wrote := l.status.Held, l.wrote
	l.mu.Unlock()
	if !held && !wrote {
		return nil
	}
	obj, err := l.client.Get(ctx, l.cfg.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && !held {
		return nil // the create that was cut off never landed
	}
	if err != nil {
		return fmt.Errorf("lease %s/%s: release: get: %w", l.cfg.Namespace, l.cfg.Name, err)
	}
	rec, err := readRecord(obj)
	if err != nil {
		return fmt.Errorf("lease %s/%s: release: %w", l.cfg.Namespace, l.cfg.Name, err)
	}
	if rec.holder != l.cfg.Identity {
		if held {
			l.lost(rec.holder)
		}
		return nil
	}
	// As leaderelection does: no holder, and a duration of one second for
	// anyone who reads the record without understanding an empty holder.
	now := l.clock.Now()
	rec.holder, rec.duration, rec.renewTime = "", time.Second, microTime(now)
	if err := writeRecord(obj, rec); err != nil {
		return err
	}
	if _, err := l.client.Update(ctx, obj, metav1.UpdateOptions{FieldManager: fieldManager}); err != nil {
		return fmt.Errorf("lease %s/%s: release: update: %w", l.cfg.Namespace, l.cfg.Name, err)
	}
	l.mu.Lock()
	l.status = Status{Holder: "", RenewTime: now}
	st := l.status
	l.mu.Unlock()
	l.logger.Info("lease released")
	l.notify(st)
	return nil
}

// tryAcquireOrRenew reads the Lease and, if it is free, expired or already
// ours, writes it with this process as holder. It reports whether this
// process holds the Lease now; err is the API error, if any. Each call is
// bounded by RetryPeriod so a hung API server does not stall the loop.
func (l *Lease) tryAcquireOrRenew(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.RetryPeriod)
	defer cancel()
	// The holder counts its renewal from before the request is sent: a
	// contender cannot see the record before it was written, so counting
	// from here keeps the holder's deadline ahead of every contender's.
	now := l.clock.Now()
	obj, err := l.client.Get(ctx, l.cfg.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return l.create(ctx, now)
	}
	if err != nil {
		return false, fmt.Errorf("get: %w", err)
	}
	rec, err := readRecord(obj)
	if err != nil {
		return false, err
	}
	// A contender counts from when the answer arrived, as client-go's
	// setObservedRecord does: the record may have been written at any time
	// during a slow GET, so counting from before it would start the
	// countdown to a takeover early by as long as the GET took.
	seen := l.clock.Now()
	l.observe(rec, seen)

	l.mu.Lock()
	expires := l.seenAt.Add(rec.duration)
	l.mu.Unlock()
	if rec.holder != "" && rec.holder != l.cfg.Identity && seen.Before(expires) {
		return false, nil
	}
	next := rec
	if rec.holder != l.cfg.Identity {
		next.acquireTime = microTime(now)
		if rec.holder != "" || rec.acquireTime != "" {
			next.transitions++
		}
	}
	next.holder, next.duration, next.renewTime = l.cfg.Identity, l.cfg.Duration, microTime(now)
	if err := writeRecord(obj, next); err != nil {
		return false, err
	}
	l.markWrote()
	updated, err := l.client.Update(ctx, obj, metav1.UpdateOptions{FieldManager: fieldManager})
	if apierrors.IsConflict(err) {
		// Someone wrote it since our read; the next round reads again.
		return false, fmt.Errorf("update: %w", err)
	}
	if err != nil {
		return false, fmt.Errorf("update: %w", err)
	}
	return l.ours(updated, now, rec.holder)
}

// create creates the Lease with this process as holder.
func (l *Lease) create(ctx context.Context, now time.Time) (bool, error) {
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "coordination.k8s.io/v1",
		"kind":       "Lease",
	}}
	obj.SetNamespace(l.cfg.Namespace)
	obj.SetName(l.cfg.Name)
	obj.SetLabels(map[string]string{"app.kubernetes.io/managed-by": "tsrelay"})
	rec := record{holder: l.cfg.Identity, duration: l.cfg.Duration, acquireTime: microTime(now), renewTime: microTime(now)}
	if err := writeRecord(obj, rec); err != nil {
		return false, err
	}
	l.markWrote()
	created, err := l.client.Create(ctx, obj, metav1.CreateOptions{FieldManager: fieldManager})
	if apierrors.IsAlreadyExists(err) {
		// Someone created it between our get and create: the next round
		// reads theirs.
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("create: %w", err)
	}
	return l.ours(created, now, "")
}

// markWrote notes that a write naming this process the holder is sent.
func (l *Lease) markWrote() {
	l.mu.Lock()
	l.wrote = true
	l.mu.Unlock()
}

// ours records a successful write of obj, sent at now; previous is the
// holder before it.
func (l *Lease) ours(obj *unstructured.Unstructured, now time.Time, previous string) (bool, error) {
	rec, err := readRecord(obj)
	if err != nil {
		return false, err
	}
	l.observe(rec, now)
	l.mu.Lock()
	wasHeld := l.status.Held
	l.renewedAt = now
	l.status = Status{Held: true, Holder: l.cfg.Identity, RenewTime: now, Expires: now.Add(l.cfg.RenewDeadline)}
	st := l.status
	l.mu.Unlock()
	if !wasHeld {
		l.logger.Info("lease acquired", "identity", l.cfg.Identity, "previous_holder", previous, "transitions", rec.transitions)
		l.notify(st)
	}
	return true, nil
}

// observe notes rec as read at now: if it differs from the record seen
// before, the expiry clock restarts.
func (l *Lease) observe(rec record, now time.Time) {
	l.mu.Lock()
	changed := !sameRecord(rec, l.observed) || l.seenAt.IsZero()
	if changed {
		l.observed, l.seenAt = rec, now
	}
	holderChanged := rec.holder != l.status.Holder
	if !l.status.Held || rec.holder != l.cfg.Identity {
		renew, _ := time.Parse(metav1.RFC3339Micro, rec.renewTime)
		l.status = Status{Holder: rec.holder, RenewTime: renew, Expires: l.seenAt.Add(rec.duration)}
	}
	st := l.status
	l.mu.Unlock()
	if holderChanged && rec.holder != "" && rec.holder != l.cfg.Identity {
		l.logger.Info("lease held by another process; waiting", "holder", rec.holder, "renewed", st.RenewTime, "expires", st.Expires)
		l.notify(st)
	}
}

func (l *Lease) notify(st Status) {
	if l.cfg.OnChange != nil {
		l.cfg.OnChange(st)
	}
}

// leasesResource names coordination.k8s.io/v1 Leases for the dynamic client.
func leasesResource() schema.GroupVersionResource {
	return schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}
}

// microTime formats t as a Lease's MicroTime fields are.
func microTime(t time.Time) string { return t.UTC().Format(metav1.RFC3339Micro) }

// readRecord returns the protocol's fields of a Lease.
func readRecord(obj *unstructured.Unstructured) (record, error) {
	rec := record{resourceVers: obj.GetResourceVersion()}
	spec, _, err := unstructured.NestedMap(obj.Object, "spec")
	if err != nil {
		return rec, fmt.Errorf("read lease spec: %w", err)
	}
	rec.holder, _ = spec["holderIdentity"].(string)
	rec.acquireTime, _ = spec["acquireTime"].(string)
	rec.renewTime, _ = spec["renewTime"].(string)
	if d, ok := spec["leaseDurationSeconds"].(int64); ok {
		rec.duration = time.Duration(d) * time.Second
	}
	rec.transitions, _ = spec["leaseTransitions"].(int64)
	return rec, nil
}

// writeRecord sets the protocol's fields of a Lease.
func writeRecord(obj *unstructured.Unstructured, rec record) error {
	spec := map[string]any{
		"holderIdentity":       rec.holder,
		"leaseDurationSeconds": int64(rec.duration / time.Second),
		"leaseTransitions":     rec.transitions,
	}
	if rec.acquireTime != "" {
		spec["acquireTime"] = rec.acquireTime
	}
	if rec.renewTime != "" {
		spec["renewTime"] = rec.renewTime
	}
	if err := unstructured.SetNestedMap(obj.Object, spec, "spec"); err != nil {
		return fmt.Errorf("set lease spec: %w", err)
	}
	return nil
}
