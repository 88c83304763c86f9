package kubeevents

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/rest"
	clienttesting "k8s.io/client-go/testing"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

const (
	testNamespace = "tsrelay"
	testPodName   = "tsrelay-5d8f7b9c4d-x2k9q"
	testPodUID    = "6f0c1b9e-2a4d-4c8e-9f3b-7d5a1e2c4b60"

	// waitTimeout bounds every wait for a condition.
	waitTimeout = 10 * time.Second
)

func testPod() Pod { return Pod{Name: testPodName, Namespace: testNamespace, UID: testPodUID} }

// fakeClock is a clock that moves only when told to.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 7, 1, 12, 0, 0, 123456789, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// logBuffer is the tests' log sink, with a line count.
type logBuffer struct{ tailnettest.LogBuffer }

// count returns how many log lines contain s.
func (b *logBuffer) count(s string) int {
	n := 0
	for line := range strings.Lines(b.String()) {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

// newFakeClient returns a dynamic/fake client that can list Events.
func newFakeClient() *dynamicfake.FakeDynamicClient {
	return dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{eventsResource(): "EventList"})
}

// newTestRecorder returns a Recorder for testPod on client, with a fake
// clock, a short retry delay and its log in a buffer (shown if t fails).
func newTestRecorder(t *testing.T, client dynamic.Interface) (*Recorder, *fakeClock, *logBuffer) {
	t.Helper()
	log := &logBuffer{}
	r := New(client, testPod(), slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if r == nil {
		t.Fatal("New returned nil")
	}
	clock := newFakeClock()
	r.now = clock.Now
	r.retryDelay = time.Millisecond
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kubeevents log:\n%s", log.String())
		}
	})
	return r, clock, log
}

// startRun runs r.Run until the test ends.
func startRun(t *testing.T, r *Recorder) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(flushTimeout + waitTimeout):
			t.Errorf("Run did not return after cancel")
		}
	})
}

// waitFor waits until cond holds, failing the test after waitTimeout.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), waitTimeout)
	defer cancel()
	err := tailnettest.WaitFor(ctx, 2*time.Millisecond, func() (bool, error) { return cond(), nil })
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// waitEvent waits until exactly one Event with eventType, reason and
// message has landed on client, with count n, and returns it.
func waitEvent(t *testing.T, client dynamic.Interface, eventType, reason, message string, n int64) *unstructured.Unstructured {
	t.Helper()
	var found *unstructured.Unstructured
	waitFor(t, fmt.Sprintf("one Event %s %s %q with count %d", eventType, reason, message, n), func() bool {
		evs := matchEvents(t, client, eventType, reason, message)
		if len(evs) == 1 && count(evs[0].Object) == n {
			found = &evs[0]
			return true
		}
		return false
	})
	return found
}

// waitEvents waits until n Events have landed on client.
func waitEvents(t *testing.T, client dynamic.Interface, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d Events", n), func() bool { return len(listEvents(t, client)) == n })
}

// countWrites counts the creates and patches of Events client receives.
func countWrites(client *dynamicfake.FakeDynamicClient) *atomic.Int32 {
	var n atomic.Int32
	client.PrependReactor("*", "events", func(a clienttesting.Action) (bool, runtime.Object, error) {
		if v := a.GetVerb(); v == "create" || v == "patch" {
			n.Add(1)
		}
		return false, nil, nil
	})
	return &n
}

// listEvents returns the Events in testNamespace, by reason and type
// ("RelayBound/Normal"); several with one reason and type are joined by
// message ("RelayBound/Normal/<message>").
func listEvents(t *testing.T, client dynamic.Interface) []unstructured.Unstructured {
	t.Helper()
	list, err := client.Resource(eventsResource()).Namespace(testNamespace).List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list events: %v", err)
	}
	return list.Items
}

// matchEvents returns the Events with eventType, reason and message.
func matchEvents(t *testing.T, client dynamic.Interface, eventType, reason, message string) []unstructured.Unstructured {
	t.Helper()
	var found []unstructured.Unstructured
	for _, ev := range listEvents(t, client) {
		if str(ev.Object, "type") == eventType && str(ev.Object, "reason") == reason && str(ev.Object, "message") == message {
			found = append(found, ev)
		}
	}
	return found
}

// findEvent returns the one Event with eventType, reason and message.
func findEvent(t *testing.T, client dynamic.Interface, eventType, reason, message string) *unstructured.Unstructured {
	t.Helper()
	found := matchEvents(t, client, eventType, reason, message)
	if len(found) != 1 {
		t.Fatalf("%d Events %s %s %q, want 1", len(found), eventType, reason, message)
	}
	return &found[0]
}

func str(obj map[string]any, fields ...string) string {
	s, _, _ := unstructured.NestedString(obj, fields...)
	return s
}

func count(obj map[string]any) int64 {
	n, _, _ := unstructured.NestedInt64(obj, "count")
	return n
}

func TestCreatesEventLikeClientGo(t *testing.T) {
	client := newFakeClient()
	r, clock, _ := newTestRecorder(t, client)
	startRun(t, r)

	const msg = "state loaded from Secret tsrelay/tsrelay-state"
	r.Normal("StateLoaded", msg)
	ev := waitEvent(t, client, "Normal", "StateLoaded", msg, 1)
	ts := clock.Now().UTC().Format(time.RFC3339)
	for _, c := range []struct {
		path []string
		want string
	}{
		{[]string{"apiVersion"}, "v1"},
		{[]string{"kind"}, "Event"},
		{[]string{"metadata", "name"}, fmt.Sprintf("%s.%x", testPodName, clock.Now().UnixNano())},
		{[]string{"metadata", "namespace"}, testNamespace},
		{[]string{"involvedObject", "apiVersion"}, "v1"},
		{[]string{"involvedObject", "kind"}, "Pod"},
		{[]string{"involvedObject", "name"}, testPodName},
		{[]string{"involvedObject", "namespace"}, testNamespace},
		{[]string{"involvedObject", "uid"}, testPodUID},
		{[]string{"source", "component"}, "tsrelay"},
		{[]string{"reportingComponent"}, "tsrelay"},
		{[]string{"reportingInstance"}, testPodName},
		{[]string{"firstTimestamp"}, ts},
		{[]string{"lastTimestamp"}, ts},
	} {
		if got := str(ev.Object, c.path...); got != c.want {
			t.Errorf("%s = %q, want %q", strings.Join(c.path, "."), got, c.want)
		}
	}
	if got := count(ev.Object); got != 1 {
		t.Errorf("count = %d, want 1", got)
	}
}

func TestRepeatsPatchCount(t *testing.T) {
	client := newFakeClient()
	r, clock, _ := newTestRecorder(t, client)
	startRun(t, r)

	const msg = "relay bound on udp :40000"
	r.Normal("RelayBound", msg)
	first := waitEvent(t, client, "Normal", "RelayBound", msg, 1)
	firstTS := str(first.Object, "firstTimestamp")

	for n := int64(2); n <= 4; n++ {
		clock.Advance(7 * time.Second)
		r.Normal("RelayBound", msg)
		ev := waitEvent(t, client, "Normal", "RelayBound", msg, n)
		if got, want := str(ev.Object, "lastTimestamp"), clock.Now().UTC().Format(time.RFC3339); got != want {
			t.Errorf("after %d records: lastTimestamp = %s, want %s", n, got, want)
		}
		if got := str(ev.Object, "firstTimestamp"); got != firstTS {
			t.Errorf("after %d records: firstTimestamp = %s, want %s (unchanged)", n, got, firstTS)
		}
		if ev.GetName() != first.GetName() {
			t.Errorf("after %d records: Event %s, want %s patched", n, ev.GetName(), first.GetName())
		}
	}

	// Same reason with another message, or another type: other Events.
	r.Normal("RelayBound", "relay bound on udp :40001")
	r.Warning("RelayBound", msg)
	waitEvent(t, client, "Normal", "RelayBound", "relay bound on udp :40001", 1)
	waitEvent(t, client, "Warning", "RelayBound", msg, 1)
	if got := count(findEvent(t, client, "Normal", "RelayBound", msg).Object); got != 4 {
		t.Errorf("count of the first Event = %d after other Events, want 4", got)
	}
	if got := len(listEvents(t, client)); got != 3 {
		t.Errorf("%d Events, want 3", got)
	}
}

func TestRepeatsFoldWhileQueued(t *testing.T) {
	client := newFakeClient()
	r, clock, _ := newTestRecorder(t, client)
	start := clock.Now()
	for range 5 {
		r.Warning("NeedsLogin", "log in at https://login.example/a1b2")
		clock.Advance(time.Second)
	}
	startRun(t, r) // only now: the five are queued as one

	waitEvents(t, client, 1)
	ev := findEvent(t, client, "Warning", "NeedsLogin", "log in at https://login.example/a1b2")
	if got := count(ev.Object); got != 5 {
		t.Errorf("count = %d, want 5: the repeats folded into one create", got)
	}
	if got, want := str(ev.Object, "firstTimestamp"), start.Format(time.RFC3339); got != want {
		t.Errorf("firstTimestamp = %s, want %s", got, want)
	}
	if got, want := str(ev.Object, "lastTimestamp"), start.Add(4*time.Second).Format(time.RFC3339); got != want {
		t.Errorf("lastTimestamp = %s, want %s", got, want)
	}
}

func TestExpiredEventIsCreatedAgain(t *testing.T) {
	client := newFakeClient()
	r, clock, _ := newTestRecorder(t, client)
	startRun(t, r)

	r.Normal("RelayBound", "bound")
	old := waitEvent(t, client, "Normal", "RelayBound", "bound", 1)
	// The API server deletes Events an hour after their last change.
	if err := client.Resource(eventsResource()).Namespace(testNamespace).Delete(t.Context(), old.GetName(), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Hour)
	r.Normal("RelayBound", "bound")

	ev := waitEvent(t, client, "Normal", "RelayBound", "bound", 1)
	if ev.GetName() == old.GetName() {
		t.Errorf("new Event has the expired one's name %s", ev.GetName())
	}
	if got, want := str(ev.Object, "firstTimestamp"), clock.Now().UTC().Format(time.RFC3339); got != want {
		t.Errorf("firstTimestamp = %s, want %s", got, want)
	}
}

func TestTruncate(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want int // bytes kept
	}{
		{"short", "relay bound", 11},
		{"exact", strings.Repeat("a", 1024), 1024},
		{"ascii", strings.Repeat("a", 2000), 1024},
		{"two-byte runes on the boundary", strings.Repeat("é", 600), 1024},
		{"two-byte rune across the boundary", "x" + strings.Repeat("é", 600), 1023},
		{"three-byte runes", strings.Repeat("€", 400), 1023},
		{"four-byte runes", "ab" + strings.Repeat("🛰", 300), 1022},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := truncate(tc.in, maxMessageBytes)
			if len(got) != tc.want || !strings.HasPrefix(tc.in, got) || !utf8.ValidString(got) {
				t.Errorf("truncate(%d bytes) = %d bytes (valid UTF-8 %v), want the first %d", len(tc.in), len(got), utf8.ValidString(got), tc.want)
			}
		})
	}
}

func TestLongMessageIsCut(t *testing.T) {
	client := newFakeClient()
	r, _, _ := newTestRecorder(t, client)
	long := "endpoints changed: " + strings.Repeat("[fd7a:115c:a1e0::1]:40000,", 100)
	r.Normal("EndpointsChanged", long)
	r.Normal("EndpointsChanged", long+"more") // the same Event once cut
	startRun(t, r)
	waitEvents(t, client, 1)
	ev := findEvent(t, client, "Normal", "EndpointsChanged", long[:maxMessageBytes])
	if got := count(ev.Object); got != 2 {
		t.Errorf("count = %d, want 2", got)
	}
}

func TestNilRecorder(t *testing.T) {
	var r *Recorder
	r.Normal("RelayBound", "bound")
	r.Warning("RelayLost", "lost")
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Run(context.Background())
	}()
	select {
	case <-done:
	case <-time.After(waitTimeout):
		t.Fatal("Run on a nil Recorder did not return")
	}
	if got := New(nil, testPod(), nil); got != nil {
		t.Errorf("New(nil client) = %p, want nil", got)
	}
	log := &logBuffer{}
	if got := New(newFakeClient(), Pod{Name: testPodName}, slog.New(slog.NewTextHandler(log, nil))); got != nil {
		t.Errorf("New without a namespace = %p, want nil", got)
	}
	if !strings.Contains(log.String(), "POD_NAMESPACE") {
		t.Errorf("New without a namespace logged %q, want it to name POD_NAMESPACE", log.String())
	}
}

func TestRunTwice(t *testing.T) {
	r, _, log := newTestRecorder(t, newFakeClient())
	startRun(t, r)
	waitFor(t, "first Run to start", r.running.Load)
	r.Run(context.Background()) // returns at once
	if log.count("Run called twice") != 1 {
		t.Errorf("no error logged for a second Run")
	}
}

func TestRateLimit(t *testing.T) {
	client := newFakeClient()
	r, clock, log := newTestRecorder(t, client)
	// Run is not running and the clock stands still: the bucket alone
	// decides.
	for i := range 40 {
		r.Normal("EndpointsChanged", fmt.Sprintf("endpoints %d", i))
	}
	if got := log.count("kube event dropped"); got != 1 {
		t.Errorf("%d drop warnings, want 1 per streak", got)
	}
	if !strings.Contains(log.String(), "rate limited") {
		t.Errorf("drop warning does not say why:\n%s", log.String())
	}
	// A repeat of a queued Event costs no token: folded (its count shows
	// it below), not dropped.
	r.Normal("EndpointsChanged", "endpoints 0")

	clock.Advance(bucketRefill) // one token
	r.Normal("EndpointsChanged", "endpoints 100")
	if got := log.count("queued again"); got != 1 {
		t.Errorf("%d 'queued again' lines, want 1", got)
	}
	r.Normal("EndpointsChanged", "endpoints 101") // no token: a new streak
	if got := log.count("kube event dropped"); got != 2 {
		t.Errorf("%d drop warnings after a second streak, want 2", got)
	}

	startRun(t, r)
	// The queue is posted in order: once a last Event, recorded now,
	// lands, everything queued before it has.
	clock.Advance(bucketRefill)
	r.Normal("EndpointsChanged", "last")
	waitEvent(t, client, "Normal", "EndpointsChanged", "last", 1)
	if got := count(findEvent(t, client, "Normal", "EndpointsChanged", "endpoints 0").Object); got != 2 {
		t.Errorf("count of the folded repeat = %d, want 2", got)
	}
	events := listEvents(t, client)
	if got, want := len(events), bucketBurst+2; got != want {
		t.Errorf("%d Events, want %d (the burst, the one refill, the last)", got, want)
	}
	landed := make(map[string]bool)
	for _, ev := range events {
		landed[str(ev.Object, "message")] = true
	}
	for i := range 40 {
		if got, want := landed[fmt.Sprintf("endpoints %d", i)], i < bucketBurst; got != want {
			t.Errorf("Event %q landed: %v, want %v", fmt.Sprintf("endpoints %d", i), got, want)
		}
	}
	if landed["endpoints 101"] {
		t.Errorf("Event %q, recorded without a token, landed", "endpoints 101")
	}
}

func TestQueueBound(t *testing.T) {
	client := newFakeClient()
	r, clock, log := newTestRecorder(t, client)
	// Plenty of tokens, but nothing posts: the queue bound decides.
	for i := range queueSize + 10 {
		clock.Advance(bucketRefill)
		r.Warning("EndpointsChanged", fmt.Sprintf("endpoints %d", i))
	}
	if got := log.count("queue full"); got != 1 {
		t.Errorf("%d 'queue full' warnings, want 1", got)
	}
	startRun(t, r)
	waitEvents(t, client, queueSize)
	// The queue has room again: a last Event lands after the others, and
	// the ten over the bound never do.
	clock.Advance(bucketRefill)
	r.Warning("EndpointsChanged", "last")
	waitEvent(t, client, "Warning", "EndpointsChanged", "last", 1)
	events := listEvents(t, client)
	if got, want := len(events), queueSize+1; got != want {
		t.Errorf("%d Events, want %d", got, want)
	}
	for _, ev := range events {
		var i int
		if _, err := fmt.Sscanf(str(ev.Object, "message"), "endpoints %d", &i); err == nil && i >= queueSize {
			t.Errorf("Event %q, recorded over the queue bound, landed", str(ev.Object, "message"))
		}
	}
}

// TestTightLoop records from many goroutines at once, as a caller stuck in
// a loop would, with the real clock: every call ends up in an Event's count
// or dropped, and the API server sees few writes.
func TestTightLoop(t *testing.T) {
	client := newFakeClient()
	writes := countWrites(client)
	r, _, log := newTestRecorder(t, client)
	r.now = time.Now
	startRun(t, r)

	const goroutines, calls = 8, 1000
	start := time.Now()
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range calls {
				switch i % 3 {
				case 0:
					r.Normal("RelayBound", "bound")
				case 1:
					r.Warning("RelayLost", "lost")
				default:
					r.Normal("EndpointsChanged", fmt.Sprintf("endpoints %d/%d", g, i))
				}
			}
		})
	}
	wg.Wait()

	// dropped is the count the Recorder logs as dropped_total.
	var total int64
	waitFor(t, "every call counted or dropped", func() bool {
		total = 0
		for _, ev := range listEvents(t, client) {
			total += count(ev.Object)
		}
		return total+int64(r.dropped.Load()) == goroutines*calls
	})
	refills := int(time.Since(start) / bucketRefill)
	if got := int(writes.Load()); got > bucketBurst+refills {
		t.Errorf("%d writes, want at most %d", got, bucketBurst+refills)
	}
	findEvent(t, client, "Normal", "RelayBound", "bound")
	findEvent(t, client, "Warning", "RelayLost", "lost")
	if got := log.count("kube event dropped"); got < 1 || got > 1+int(writes.Load()) {
		t.Errorf("%d drop warnings, want one per streak", got)
	}
	t.Logf("%d calls: %d writes, %d in Event counts", goroutines*calls, writes.Load(), total)
}

func TestFailuresLoggedOncePerStreak(t *testing.T) {
	client := newFakeClient()
	var forbid atomic.Bool
	var creates atomic.Int32
	forbid.Store(true)
	client.PrependReactor("create", "events", func(a clienttesting.Action) (bool, runtime.Object, error) {
		creates.Add(1)
		if forbid.Load() {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "events"}, "", fmt.Errorf("no RBAC"))
		}
		return false, nil, nil
	})
	r, _, log := newTestRecorder(t, client)
	startRun(t, r)

	r.Normal("StateLoaded", "loaded")
	r.Normal("RelayBound", "bound")
	r.Warning("RelayLost", "lost")
	// One warning, then debug lines, each naming the Event it failed.
	waitFor(t, "3 failures logged", func() bool { return log.count("kube event not posted") == 3 })
	if got := creates.Load(); got != 3 {
		t.Errorf("%d creates, want 3: Forbidden is not retried", got)
	}
	if got := log.count(`level=WARN msg="kube event not posted`); got != 1 {
		t.Errorf("%d failure warnings, want 1", got)
	}
	if !strings.Contains(log.String(), `the Role needs \"create\" and \"patch\" on events`) {
		t.Errorf("failure warning does not name the verbs:\n%s", log.String())
	}

	forbid.Store(false)
	r.Normal("RelayBound", "bound again")
	waitEvent(t, client, "Normal", "RelayBound", "bound again", 1)
	if got := len(listEvents(t, client)); got != 1 {
		t.Errorf("%d Events, want only the one posted after the Role was fixed", got)
	}
	waitFor(t, "'posted again' logged", func() bool { return log.count("kube events posted again") == 1 })
	if !strings.Contains(log.String(), "failed_total=3") {
		t.Errorf("'posted again' line does not count the 3 failures:\n%s", log.String())
	}
}

func TestRetriesOnce(t *testing.T) {
	for _, tc := range []struct {
		name     string
		failures int32 // creates that fail before one succeeds
		wantPost bool  // whether the Event lands
	}{
		{"TransientFailure", 1, true},
		{"PersistentFailure", 100, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client := newFakeClient()
			var creates atomic.Int32
			client.PrependReactor("create", "events", func(a clienttesting.Action) (bool, runtime.Object, error) {
				if creates.Add(1) <= tc.failures {
					return true, nil, apierrors.NewServiceUnavailable("etcd is sulking")
				}
				return false, nil, nil
			})
			r, _, log := newTestRecorder(t, client)
			startRun(t, r)
			r.Normal("RelayBound", "bound")
			if tc.wantPost {
				waitEvent(t, client, "Normal", "RelayBound", "bound", 1)
			} else {
				waitFor(t, "the failure logged", func() bool { return log.count("kube event not posted") == 1 })
				if got := len(listEvents(t, client)); got != 0 {
					t.Errorf("%d Events, want 0", got)
				}
			}
			if got := creates.Load(); got != 2 {
				t.Errorf("%d creates, want 2 (one retry)", got)
			}
			if got, want := log.count("kube event not posted"), map[bool]int{true: 0, false: 1}[tc.wantPost]; got != want {
				t.Errorf("%d failures logged, want %d", got, want)
			}
		})
	}
}

func TestRunFlushesQueueOnStop(t *testing.T) {
	client := newFakeClient()
	r, _, log := newTestRecorder(t, client)
	r.Normal("RelayBound", "bound")
	r.Warning("RelayLost", "lost: shutting down")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r.Run(ctx) // ctx is done already: flush and return

	findEvent(t, client, "Normal", "RelayBound", "bound")
	findEvent(t, client, "Warning", "RelayLost", "lost: shutting down")
	if got := len(listEvents(t, client)); got != 2 {
		t.Errorf("%d Events after Run, want 2", got)
	}
	r.Normal("StateLoaded", "too late")
	if !strings.Contains(log.String(), "recorder stopped") {
		t.Errorf("no drop warning saying the recorder stopped:\n%s", log.String())
	}
	if got := len(listEvents(t, client)); got != 2 {
		t.Errorf("%d Events after a record past Run, want 2", got)
	}
}

// TestRunReturnsWhenAPIServerHangs checks the shutdown bound: with an API
// server that never answers, Run returns about flushTimeout after its ctx
// ends, counting what it could not post as dropped.
func TestRunReturnsWhenAPIServerHangs(t *testing.T) {
	var requests atomic.Int32
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		requests.Add(1)
		select {
		case <-req.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) }) // before srv.Close, which waits for handlers
	client, err := dynamic.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	r, _, log := newTestRecorder(t, client)
	r.Normal("StateLoaded", "loaded")
	r.Normal("RelayBound", "bound")
	r.Warning("RelayLost", "lost")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Run(ctx)
	}()
	waitFor(t, "the first post to reach the server", func() bool { return requests.Load() > 0 })
	cancel()
	cancelled := time.Now()
	select {
	case <-done:
	case <-time.After(flushTimeout + waitTimeout):
		t.Fatal("Run did not return")
	}
	took := time.Since(cancelled)
	t.Logf("Run returned %v after cancel", took.Round(time.Millisecond))
	if took > flushTimeout+time.Second {
		t.Errorf("Run returned %v after cancel, want about %v", took, flushTimeout)
	}
	// The post in flight is given up; the two behind it are dropped.
	if got := requests.Load(); got != 1 {
		t.Errorf("%d requests, want 1: a post cut short by shutdown is not retried", got)
	}
	if !strings.Contains(log.String(), `msg="kube events dropped at shutdown" count=2`) {
		t.Errorf("no warning that 2 Events were dropped at shutdown:\n%s", log.String())
	}
}

// TestForgetsLeastRecentlyPosted checks the dedup cache's bound: once more
// than dedupKeys distinct Events have been posted, a repeat of the least
// recently posted one becomes a new Event, and a repeat of a recent one
// still raises its count.
func TestForgetsLeastRecentlyPosted(t *testing.T) {
	client := newFakeClient()
	r, clock, _ := newTestRecorder(t, client)
	startRun(t, r)

	msg := func(i int) string { return fmt.Sprintf("endpoints %d", i) }
	record := func(i int) {
		clock.Advance(bucketRefill) // a token for each
		r.Normal("EndpointsChanged", msg(i))
	}
	for i := range dedupKeys + 1 {
		record(i)
		// One at a time, so the order of posts is the order here.
		waitFor(t, fmt.Sprintf("Event %q", msg(i)), func() bool { return len(listEvents(t, client)) == i+1 })
	}
	record(0)         // forgotten: created anew
	record(dedupKeys) // remembered: patched
	waitFor(t, "a second Event for the forgotten key and a count of 2 for the recent one", func() bool {
		var zeros int
		var last int64
		for _, ev := range listEvents(t, client) {
			switch str(ev.Object, "message") {
			case msg(0):
				zeros++
			case msg(dedupKeys):
				last = count(ev.Object)
			}
		}
		return zeros == 2 && last == 2
	})
}
