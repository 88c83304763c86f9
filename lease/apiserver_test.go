package lease

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// Test timings: fake clocks make them free, so they are the defaults.
const (
	testDuration = DefaultDuration
	testRetry    = DefaultRetryPeriod
)

// relayRules is the part of manifests/rbac.yaml for the Lease, with the
// Lease named "state".
var relayRules = []rbacv1.PolicyRule{
	{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, ResourceNames: []string{"state"}, Verbs: []string{"get", "update"}},
	{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"create"}},
}

// contender is one process's Lease with its own fake clock, a switch that
// makes its API calls fail, as a partition from the API server would, and
// a delay, on its fake clock, before each call reaches the API server.
type contender struct {
	*Lease
	clock  *clocktesting.FakeClock
	broken *atomic.Bool
	delay  *atomic.Int64 // a time.Duration
	// answerDelay holds each write's answer back for as long, after the
	// API server has acted on it.
	answerDelay *atomic.Int64
}

// faultyTransport holds each request for delay on clock before it reaches
// the API server (so the answer shows the Lease as it is at the end of the
// delay, as a slow network's would), then fails it while broken is set;
// it holds each write's answer back for answer.
type faultyTransport struct {
	rt     http.RoundTripper
	clock  *clocktesting.FakeClock
	broken *atomic.Bool
	delay  *atomic.Int64
	answer *atomic.Int64
}

func (f faultyTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if err := f.wait(r, f.delay); err != nil {
		return nil, err
	}
	if f.broken.Load() {
		return nil, errors.New("test: API server unreachable")
	}
	resp, err := f.rt.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	if r.Method == http.MethodGet {
		return resp, nil
	}
	if err := f.wait(r, f.answer); err != nil {
		resp.Body.Close()
		return nil, err
	}
	return resp, nil
}

// wait waits for the duration in d on the fake clock, or until the request
// is cancelled.
func (f faultyTransport) wait(r *http.Request, d *atomic.Int64) error {
	if d := time.Duration(d.Load()); d > 0 {
		select {
		case <-f.clock.After(d):
		case <-r.Context().Done():
			return r.Context().Err()
		}
	}
	return nil
}

// TestAgainstAPIServer runs the protocol against a real kube-apiserver,
// acting as a ServiceAccount granted what manifests/rbac.yaml grants. Each
// process has its own fake clock, stepped by the test: nothing sleeps.
func TestAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)

	// setup returns a namespace where ServiceAccount "relay" has the
	// relay's Lease rules.
	setup := func(t *testing.T) string {
		ns := srv.NamespaceForTest(t, nil)
		srv.GrantForTest(t, ns, "relay", relayRules...)
		return ns
	}
	newContender := func(t *testing.T, ns, identity string) *contender {
		t.Helper()
		cfg := srv.Config(srv.ServiceAccountTokenForTest(t, ns, "relay"))
		broken, delay, answer := new(atomic.Bool), new(atomic.Int64), new(atomic.Int64)
		clk := clocktesting.NewFakeClock(time.Now())
		cfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { return faultyTransport{rt, clk, broken, delay, answer} }
		dc, err := dynamic.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		l, err := New(Config{Client: dc, Namespace: ns, Name: "state", Identity: identity, Clock: clk, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
		if err != nil {
			t.Fatal(err)
		}
		return &contender{Lease: l, clock: clk, broken: broken, delay: delay, answerDelay: answer}
	}

	t.Run("CreatesAndReleases", func(t *testing.T) {
		ns := setup(t)
		a := newContender(t, ns, "a")
		if err := a.Acquire(t.Context()); err != nil {
			t.Fatalf("Acquire: %v", err)
		}
		lease := getLease(t, admin, ns)
		if got := *lease.Spec.HolderIdentity; got != "a" {
			t.Errorf("holder = %q, want a", got)
		}
		if got := *lease.Spec.LeaseDurationSeconds; got != int32(testDuration/time.Second) {
			t.Errorf("leaseDurationSeconds = %d, want %d", got, testDuration/time.Second)
		}
		if st := a.Status(); !st.Held || st.Holder != "a" {
			t.Errorf("Status() = %+v, want held by a", st)
		}
		if err := a.Release(t.Context()); err != nil {
			t.Fatalf("Release: %v", err)
		}
		lease = getLease(t, admin, ns)
		if h := lease.Spec.HolderIdentity; h != nil && *h != "" {
			t.Errorf("holder after Release = %q, want none", *h)
		}
		if st := a.Status(); st.Held {
			t.Errorf("Status() after Release = %+v, want not held", st)
		}
	})

	t.Run("SecondWaitsWhileFirstRenews", func(t *testing.T) {
		ns := setup(t)
		a, b := newContender(t, ns, "a"), newContender(t, ns, "b")
		if err := a.Acquire(t.Context()); err != nil {
			t.Fatal(err)
		}
		holdErr := goHold(t, a)
		acquired := goAcquire(t, b)
		waitWaiting(t, b, "a")
		// Three lease durations pass for both; a renews every retry
		// period, so b must never see the same record for a whole
		// duration.
		for range 3 * int(testDuration/testRetry) {
			stepAndWait(t, a, testRetry)
			stepAndWait(t, b, testRetry)
			select {
			case err := <-acquired:
				t.Fatalf("b acquired the lease while a renewed it (err %v)", err)
			default:
			}
		}
		if st := b.Status(); st.Held || st.Holder != "a" || st.Expires.IsZero() {
			t.Errorf("b.Status() = %+v, want waiting on a with an expiry", st)
		}
		if got := *getLease(t, admin, ns).Spec.HolderIdentity; got != "a" {
			t.Errorf("holder = %q, want a", got)
		}
		stopHold(t, a, holdErr)
	})

	t.Run("TakeoverAfterExpiry", func(t *testing.T) {
		ns := setup(t)
		a, b := newContender(t, ns, "a"), newContender(t, ns, "b")
		if err := a.Acquire(t.Context()); err != nil {
			t.Fatal(err)
		}
		// a is killed: it neither renews nor releases.
		acquired := goAcquire(t, b)
		waitWaiting(t, b, "a")
		start := b.clock.Now()
		var took time.Duration
	loop:
		for {
			select {
			case err := <-acquired:
				if err != nil {
					t.Fatalf("b.Acquire: %v", err)
				}
				took = b.clock.Since(start)
				break loop
			default:
			}
			if b.clock.Since(start) > testDuration+2*testRetry {
				t.Fatalf("b has not taken over %v after a stopped renewing", b.clock.Since(start))
			}
			stepAndWaitOr(t, b, testRetry, acquired)
		}
		if took < testDuration {
			t.Errorf("b took over after %v, before the lease duration %v", took, testDuration)
		}
		lease := getLease(t, admin, ns)
		if got := *lease.Spec.HolderIdentity; got != "b" {
			t.Errorf("holder = %q, want b", got)
		}
		if got := *lease.Spec.LeaseTransitions; got != 1 {
			t.Errorf("leaseTransitions = %d, want 1", got)
		}
		// Were a to come back, its next renewal finds b and gives up.
		holdErr := goHold(t, a)
		stepAndWaitOr(t, a, testRetry, holdErr)
		if err := waitErr(t, holdErr); err == nil || !strings.Contains(err.Error(), `held by "b"`) {
			t.Errorf("a.Hold after the takeover = %v, want an error saying b holds it", err)
		}
	})

	t.Run("ReleaseLetsTheNextTakeOverAtOnce", func(t *testing.T) {
		ns := setup(t)
		a, b := newContender(t, ns, "a"), newContender(t, ns, "b")
		if err := a.Acquire(t.Context()); err != nil {
			t.Fatal(err)
		}
		acquired := goAcquire(t, b)
		waitWaiting(t, b, "a")
		if err := a.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
		b.clock.Step(testRetry) // one look, far short of the duration
		if err := waitErr(t, acquired); err != nil {
			t.Fatalf("b.Acquire: %v", err)
		}
		if got := *getLease(t, admin, ns).Spec.HolderIdentity; got != "b" {
			t.Errorf("holder = %q, want b", got)
		}
	})

	t.Run("StoppedAcquireStillReleases", func(t *testing.T) {
		// A relay stopped (SIGTERM) while its Acquire's write is on the
		// way: the API server makes it the holder, but the answer never
		// arrives. Release must clear the Lease all the same, or the
		// next pod waits a whole lease duration.
		ns := setup(t)
		a := newContender(t, ns, "a")
		a.answerDelay.Store(int64(time.Second))
		ctx, cancel := context.WithCancel(t.Context())
		acquired := make(chan error, 1)
		go func() { acquired <- a.Acquire(ctx) }()
		waitClock(t, a) // the create landed; its answer is held back
		cancel()
		if err := waitErr(t, acquired); err == nil {
			t.Fatal("Acquire succeeded after its context was cancelled")
		}
		if got := *getLease(t, admin, ns).Spec.HolderIdentity; got != "a" {
			t.Fatalf("holder = %q, want a (the create landed)", got)
		}
		a.answerDelay.Store(0)
		if err := a.Release(t.Context()); err != nil {
			t.Fatalf("Release: %v", err)
		}
		if h := getLease(t, admin, ns).Spec.HolderIdentity; h != nil && *h != "" {
			t.Errorf("holder after Release of a stopped Acquire = %q, want none", *h)
		}
	})

	t.Run("SameIdentityTakesItsOwnLeaseBack", func(t *testing.T) {
		// A container restarted in the same pod does not wait for its
		// own lease to expire.
		ns := setup(t)
		if err := newContender(t, ns, "pod-1").Acquire(t.Context()); err != nil {
			t.Fatal(err)
		}
		if err := newContender(t, ns, "pod-1").Acquire(t.Context()); err != nil {
			t.Fatalf("Acquire by the same identity: %v", err)
		}
	})

	t.Run("ShortOutageCostsNothing", func(t *testing.T) {
		ns := setup(t)
		a, b := newContender(t, ns, "a"), newContender(t, ns, "b")
		if err := a.Acquire(t.Context()); err != nil {
			t.Fatal(err)
		}
		holdErr := goHold(t, a)
		acquired := goAcquire(t, b)
		waitWaiting(t, b, "a")
		// a cannot reach the API server for just under its renew
		// deadline; b, which can, waits on.
		a.broken.Store(true)
		for a.clock.Since(a.Status().RenewTime)+2*testRetry < DefaultRenewDeadline {
			stepAndWait(t, a, testRetry)
			stepAndWait(t, b, testRetry)
		}
		select {
		case err := <-holdErr:
			t.Fatalf("a.Hold returned during a short outage: %v", err)
		default:
		}
		a.broken.Store(false)
		renewed := a.Status().RenewTime
		stepAndWait(t, a, testRetry)
		if !a.Status().RenewTime.After(renewed) {
			t.Errorf("a did not renew after the outage: Status() = %+v", a.Status())
		}
		for range 2 * int(testDuration/testRetry) {
			stepAndWait(t, a, testRetry)
			stepAndWait(t, b, testRetry)
		}
		select {
		case err := <-acquired:
			t.Fatalf("b acquired the lease after a's short outage (err %v)", err)
		default:
		}
		stopHold(t, a, holdErr)
	})

	t.Run("FailedRenewalStopsBeforeTakeover", func(t *testing.T) {
		ns := setup(t)
		a, b := newContender(t, ns, "a"), newContender(t, ns, "b")
		if err := a.Acquire(t.Context()); err != nil {
			t.Fatal(err)
		}
		holdErr := goHold(t, a)
		acquired := goAcquire(t, b)
		waitWaiting(t, b, "a")
		a.broken.Store(true)
		// Both clocks run together; a must give up before b may take
		// over.
		var gaveUp time.Duration
		start := a.clock.Now()
		for gaveUp == 0 {
			if a.clock.Since(start) > testDuration {
				t.Fatal("a still holds the lease a whole duration after its renewals began to fail")
			}
			stepAndWaitOr(t, a, testRetry, holdErr)
			select {
			case err := <-holdErr:
				if err == nil || !strings.Contains(err.Error(), "not renewed for") {
					t.Fatalf("a.Hold = %v, want a renew-deadline error", err)
				}
				gaveUp = a.clock.Since(start)
			default:
			}
			select {
			case err := <-acquired:
				t.Fatalf("b acquired the lease while a still held it (err %v)", err)
			default:
			}
			stepAndWait(t, b, testRetry)
		}
		if gaveUp > DefaultRenewDeadline+testRetry {
			t.Errorf("a gave up after %v, want within its renew deadline %v plus one retry", gaveUp, DefaultRenewDeadline)
		}
		if st := a.Status(); st.Held {
			t.Errorf("a.Status() = %+v after giving up, want not held", st)
		}
		for {
			stepAndWaitOr(t, b, testRetry, acquired)
			select {
			case err := <-acquired:
				if err != nil {
					t.Fatal(err)
				}
				return
			default:
			}
			if b.clock.Since(start) > testDuration+3*testRetry {
				t.Fatal("b has not taken over the abandoned lease")
			}
		}
	})

	t.Run("MarginHoldsWithSlowAPI", func(t *testing.T) {
		// Every call a and b make takes just under a retry period to
		// reach the API server; then a's calls also fail. However long
		// its attempts take, a must give up at its renew deadline, and b
		// must count the lease duration from when it read a's last
		// renewal, so that a has Duration-RenewDeadline to stop its node
		// before b may start one. Both clocks run together in small
		// steps; elapsed is the time on both.
		ns := setup(t)
		a, b := newContender(t, ns, "a"), newContender(t, ns, "b")
		if err := a.Acquire(t.Context()); err != nil {
			t.Fatal(err)
		}
		holdErr := goHold(t, a)
		acquired := goAcquire(t, b)
		waitWaiting(t, b, "a")
		const step = 100 * time.Millisecond
		slow := testRetry - step
		a.delay.Store(int64(slow))
		b.delay.Store(int64(slow))
		margin := testDuration - DefaultRenewDeadline
		var (
			elapsed, lastRenewal, gaveUp, tookOver time.Duration
			seenRenewal                            = b.Status().RenewTime
		)
		for tookOver == 0 {
			if elapsed > 3*testDuration {
				t.Fatalf("after %v: a gave up at %v, b has not taken over", elapsed, gaveUp)
			}
			if elapsed == 4*testRetry {
				a.broken.Store(true)
				lastRenewal = elapsed - a.clock.Since(a.Status().RenewTime)
			}
			if gaveUp == 0 {
				stepAndWaitOr(t, a, step, holdErr)
			}
			stepAndWaitOr(t, b, step, acquired)
			elapsed += step
			if gaveUp == 0 && len(holdErr) > 0 {
				gaveUp = elapsed
				if err := <-holdErr; err == nil || !strings.Contains(err.Error(), "not renewed for") {
					t.Errorf("a.Hold = %v, want a renew-deadline error", err)
				}
			}
			if st := b.Status(); st.Holder == "a" && !st.RenewTime.Equal(seenRenewal) {
				// b has just read a renewal: its countdown must start
				// now, when the answer came, not when it sent the GET.
				seenRenewal = st.RenewTime
				if want := b.clock.Now().Add(testDuration); st.Expires.Before(want) {
					t.Errorf("b read a renewal at %v and will take over at %v, %v before a lease duration from the read",
						elapsed, elapsed+st.Expires.Sub(b.clock.Now()), want.Sub(st.Expires))
				}
			}
			if len(acquired) > 0 {
				tookOver = elapsed
				if err := <-acquired; err != nil {
					t.Fatalf("b.Acquire: %v", err)
				}
			}
		}
		t.Logf("a renewed last at %v and gave up at %v; b took over at %v: margin %v", lastRenewal, gaveUp, tookOver, tookOver-gaveUp)
		if gaveUp == 0 {
			t.Fatalf("b took over at %v while a still held the lease", tookOver)
		}
		if late := gaveUp - (lastRenewal + DefaultRenewDeadline); late > step {
			t.Errorf("a gave up %v after its last renewal, %v past its renew deadline %v", gaveUp-lastRenewal, late, DefaultRenewDeadline)
		}
		if tookOver-gaveUp < margin {
			t.Errorf("b took over %v after a gave up, want at least Duration-RenewDeadline = %v", tookOver-gaveUp, margin)
		}
	})

	t.Run("ForbiddenSaysWhichVerbs", func(t *testing.T) {
		ns := srv.NamespaceForTest(t, nil) // no Role
		a := newContender(t, ns, "a")
		err := a.Acquire(t.Context())
		if err == nil || !strings.Contains(err.Error(), `"get" and "update" on this Lease`) {
			t.Fatalf("Acquire without RBAC = %v, want an error naming the verbs", err)
		}
	})
}

func getLease(t *testing.T, admin kubernetes.Interface, ns string) *coordinationv1.Lease {
	t.Helper()
	l, err := admin.CoordinationV1().Leases(ns).Get(t.Context(), "state", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get lease as admin: %v", err)
	}
	return l
}

// goAcquire runs c.Acquire in the background until the test ends.
func goAcquire(t *testing.T, c *contender) <-chan error {
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() { done <- c.Acquire(ctx); close(finished) }()
	t.Cleanup(func() { cancel(); <-finished })
	return done
}

// goHold runs c.Hold in the background; stopHold ends it.
func goHold(t *testing.T, c *contender) chan error {
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() { done <- c.Hold(ctx); close(finished) }()
	t.Cleanup(func() { cancel(); <-finished })
	waitClock(t, c)
	return done
}

// waitClock waits until something waits on c's clock.
func waitClock(t *testing.T, c *contender) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := tailnettest.WaitFor(ctx, 2*time.Millisecond, func() (bool, error) { return c.clock.HasWaiters(), nil }); err != nil {
		t.Fatalf("nothing waits on the contender's clock: %v", err)
	}
}

func stopHold(t *testing.T, c *contender, done chan error) {
	t.Helper()
	// Hold returns nil once its context is done; the test's context ends
	// only after the test, so Release proves the holder still held it.
	if err := c.Release(t.Context()); err != nil {
		t.Errorf("Release: %v", err)
	}
	select {
	case err := <-done:
		t.Fatalf("Hold returned before the test stopped it: %v", err)
	default:
	}
}

// waitErr waits for the result on done.
func waitErr(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("timed out waiting for the lease call to return")
		return nil
	}
}

// waitWaiting waits until c has seen holder and is waiting on its clock.
func waitWaiting(t *testing.T, c *contender, holder string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	err := tailnettest.WaitFor(ctx, 5*time.Millisecond, func() (bool, error) {
		return c.Status().Holder == holder && c.clock.HasWaiters(), nil
	})
	if err != nil {
		t.Fatalf("contender never waited on %s: status %+v: %v", holder, c.Status(), err)
	}
}

// stepAndWait moves c's clock by d and waits until c is waiting on it
// again, that is until it has finished the round d started.
func stepAndWait(t *testing.T, c *contender, d time.Duration) {
	t.Helper()
	stepAndWaitOr(t, c, d, nil)
}

// stepAndWaitOr is stepAndWait that also stops waiting when done (the
// loop's result) is ready; it does not receive from done.
func stepAndWaitOr(t *testing.T, c *contender, d time.Duration, done <-chan error) {
	t.Helper()
	before := c.clock.Waiters()
	if before == 0 && len(done) == 0 {
		t.Fatal("stepAndWait: nothing waits on the clock")
	}
	c.clock.Step(d)
	// Each timer the step fired woke a goroutine that, unless its loop
	// returned, waits on the clock again once its round is over.
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	err := tailnettest.WaitFor(ctx, time.Millisecond, func() (bool, error) {
		return c.clock.Waiters() >= before || len(done) > 0, nil
	})
	if err != nil {
		t.Fatalf("contender did not finish its round: %v", err)
	}
}
