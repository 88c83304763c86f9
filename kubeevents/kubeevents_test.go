package kubeevents

import (
	"bytes"
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

// logBuffer is a bytes.Buffer safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

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
	r := New(client, testPod(), "tsrelay", slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelDebug})))
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

// waitStats waits until r's Stats are want.
func waitStats(t *testing.T, r *Recorder, want Stats) {
	t.Helper()
	var got Stats
	waitFor(t, fmt.Sprintf("Stats %+v", want), func() bool {
		got = r.Stats()
		return got == want
	})
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

// findEvent returns the one Event with eventType, reason and message.
func findEvent(t *testing.T, client dynamic.Interface, eventType, reason, message string) *unstructured.Unstructured {
	t.Helper()
	var found []unstructured.Unstructured
	for _, ev := range listEvents(t, client) {
		if str(ev.Object, "type") == eventType && str(ev.Object, "reason") == reason && str(ev.Object, "message") == message {
			found = append(found, ev)
		}
	}
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
	waitStats(t, r, Stats{Created: 1})

	ev := findEvent(t, client, "Normal", "StateLoaded", msg)
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
	waitStats(t, r, Stats{Created: 1})
	first := findEvent(t, client, "Normal", "RelayBound", msg)
	firstTS := str(first.Object, "firstTimestamp")

	for n := int64(2); n <= 4; n++ {
		clock.Advance(7 * time.Second)
		r.Normal("RelayBound", msg)
		waitStats(t, r, Stats{Created: 1, Patched: uint64(n - 1)})
		ev := findEvent(t, client, "Normal", "RelayBound", msg)
		if got := count(ev.Object); got != n {
			t.Errorf("after %d records: count = %d, want %d", n, got, n)
		}
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
	waitStats(t, r, Stats{Created: 3, Patched: 3})
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

	waitStats(t, r, Stats{Created: 1})
	ev := findEvent(t, client, "Warning", "NeedsLogin", "log in at https://login.example/a1b2")
	if got := count(ev.Object); got != 5 {
		t.Errorf("count = %d, want 5", got)
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
	waitStats(t, r, Stats{Created: 1})
	old := findEvent(t, client, "Normal", "RelayBound", "bound")
	// The API server deletes Events an hour after their last change.
	if err := client.Resource(eventsResource()).Namespace(testNamespace).Delete(t.Context(), old.GetName(), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Hour)
	r.Normal("RelayBound", "bound")
	waitStats(t, r, Stats{Created: 2})

	ev := findEvent(t, client, "Normal", "RelayBound", "bound")
	if ev.GetName() == old.GetName() {
		t.Errorf("new Event has the expired one's name %s", ev.GetName())
	}
	if got := count(ev.Object); got != 1 {
		t.Errorf("count = %d, want 1", got)
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
	waitStats(t, r, Stats{Created: 1})
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
	if got := r.Stats(); got != (Stats{}) {
		t.Errorf("Stats() = %+v, want zero", got)
	}

	if got := New(nil, testPod(), "tsrelay", nil); got != nil {
		t.Errorf("New(nil client) = %p, want nil", got)
	}
	log := &logBuffer{}
	if got := New(newFakeClient(), Pod{Name: testPodName}, "tsrelay", slog.New(slog.NewTextHandler(log, nil))); got != nil {
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
	if got, want := r.Stats(), (Stats{Dropped: 40 - bucketBurst}); got != want {
		t.Errorf("after 40 distinct Events: Stats = %+v, want %+v", got, want)
	}
	if got := log.count("kube event dropped"); got != 1 {
		t.Errorf("%d drop warnings, want 1 per streak", got)
	}
	if !strings.Contains(log.String(), "rate limited") {
		t.Errorf("drop warning does not say why:\n%s", log.String())
	}
	// A repeat of a queued Event costs no post: folded, not dropped.
	r.Normal("EndpointsChanged", "endpoints 0")
	if got := r.Stats().Dropped; got != 40-bucketBurst {
		t.Errorf("a repeat of a queued Event was dropped")
	}

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
	waitStats(t, r, Stats{Created: bucketBurst + 1, Dropped: 40 - bucketBurst + 1})
	if got := count(findEvent(t, client, "Normal", "EndpointsChanged", "endpoints 0").Object); got != 2 {
		t.Errorf("count of the folded repeat = %d, want 2", got)
	}
	if got := len(listEvents(t, client)); got != bucketBurst+1 {
		t.Errorf("%d Events, want %d", got, bucketBurst+1)
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
	if got, want := r.Stats(), (Stats{Dropped: 10}); got != want {
		t.Errorf("Stats = %+v, want %+v", got, want)
	}
	if got := log.count("queue full"); got != 1 {
		t.Errorf("%d 'queue full' warnings, want 1", got)
	}
	startRun(t, r)
	waitStats(t, r, Stats{Created: queueSize, Dropped: 10})
}

// TestTightLoop records from many goroutines at once, as a caller stuck in
// a loop would, with the real clock: every call ends up in an Event's count
// or in Dropped, and the API server sees few writes.
func TestTightLoop(t *testing.T) {
	client := newFakeClient()
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

	var total int64
	waitFor(t, "every call counted or dropped", func() bool {
		total = 0
		for _, ev := range listEvents(t, client) {
			total += count(ev.Object)
		}
		return total+int64(r.Stats().Dropped) == goroutines*calls
	})
	st := r.Stats()
	refills := int(time.Since(start) / bucketRefill)
	if writes := st.Created + st.Patched; writes > uint64(bucketBurst+refills) {
		t.Errorf("%d writes (%+v), want at most %d", writes, st, bucketBurst+refills)
	}
	if got := log.count("kube event dropped"); got < 1 || got > 1+int(st.Created+st.Patched) {
		t.Errorf("%d drop warnings, want one per streak", got)
	}
	t.Logf("%d calls: %+v, %d in Event counts", goroutines*calls, st, total)
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
	waitStats(t, r, Stats{Failed: 3})
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
	waitStats(t, r, Stats{Created: 1, Failed: 3})
	if got := log.count("kube events posted again"); got != 1 {
		t.Errorf("%d 'posted again' lines, want 1", got)
	}
}

func TestRetriesOnce(t *testing.T) {
	for _, tc := range []struct {
		name      string
		failures  int32 // creates that fail before one succeeds
		wantStats Stats
	}{
		{"TransientFailure", 1, Stats{Created: 1}},
		{"PersistentFailure", 100, Stats{Failed: 1}},
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
			r, _, _ := newTestRecorder(t, client)
			startRun(t, r)
			r.Normal("RelayBound", "bound")
			waitStats(t, r, tc.wantStats)
			if got := creates.Load(); got != 2 {
				t.Errorf("%d creates, want 2 (one retry)", got)
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

	if got, want := r.Stats(), (Stats{Created: 2}); got != want {
		t.Errorf("Stats after Run = %+v, want %+v", got, want)
	}
	r.Normal("StateLoaded", "too late")
	if got, want := r.Stats(), (Stats{Created: 2, Dropped: 1}); got != want {
		t.Errorf("Stats after a record past Run = %+v, want %+v", got, want)
	}
	if !strings.Contains(log.String(), "recorder stopped") {
		t.Errorf("no drop warning saying the recorder stopped:\n%s", log.String())
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
	r, _, _ := newTestRecorder(t, client)
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
	if got, want := r.Stats(), (Stats{Dropped: 3}); got != want {
		t.Errorf("Stats = %+v, want %+v", got, want)
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
