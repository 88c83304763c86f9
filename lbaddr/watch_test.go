package lbaddr

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"
)

// waitTimeout bounds every wait for the watcher to react.
const waitTimeout = 5 * time.Second

// broadcaster wakes every goroutine waiting on it.
type broadcaster struct {
	mu sync.Mutex
	ch chan struct{}
}

func (b *broadcaster) wait() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch == nil {
		b.ch = make(chan struct{})
	}
	return b.ch
}

func (b *broadcaster) broadcast() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch != nil {
		close(b.ch)
	}
	b.ch = make(chan struct{})
}

// waitFor waits until cond holds, re-checking it each time b broadcasts,
// and fails the test after waitTimeout.
func waitFor(t *testing.T, b *broadcaster, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		wake := b.wait()
		if cond() {
			return
		}
		select {
		case <-wake:
		case <-deadline.C:
			t.Fatalf("waited %v for %s", waitTimeout, what)
		}
	}
}

// report is one call of OnChange.
type report struct {
	found []Endpoint
	why   string
	at    time.Time
}

func (r report) String() string {
	if r.why != "" {
		return fmt.Sprintf("none (%s)", r.why)
	}
	return fmt.Sprint(endpointStrings(r.found))
}

// recorder collects OnChange calls and the watcher's log.
type recorder struct {
	broadcaster
	mu      sync.Mutex
	reports []report
	log     lockedBuffer
}

func (r *recorder) onChange(found []Endpoint, why string) {
	r.mu.Lock()
	r.reports = append(r.reports, report{found: found, why: why, at: time.Now()})
	r.mu.Unlock()
	r.broadcast()
}

func (r *recorder) all() []report {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.reports)
}

func (r *recorder) latest() (report, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.reports) == 0 {
		return report{}, false
	}
	return r.reports[len(r.reports)-1], true
}

// waitReport waits until the latest report satisfies ok, and returns it.
func (r *recorder) waitReport(t *testing.T, what string, ok func(report) bool) report {
	t.Helper()
	var last report
	waitFor(t, &r.broadcaster, what, func() bool {
		var any bool
		last, any = r.latest()
		return any && ok(last)
	})
	return last
}

// waitFound waits until the latest report is exactly want, with no why.
func (r *recorder) waitFound(t *testing.T, want ...Endpoint) report {
	t.Helper()
	return r.waitReport(t, fmt.Sprintf("endpoints %v", endpointStrings(want)), func(got report) bool {
		return got.why == "" && slices.Equal(got.found, want)
	})
}

// waitWhy waits until the latest report is empty with a why containing
// want.
func (r *recorder) waitWhy(t *testing.T, want string) report {
	t.Helper()
	return r.waitReport(t, fmt.Sprintf("no endpoints because %q", want), func(got report) bool {
		return len(got.found) == 0 && strings.Contains(got.why, want)
	})
}

// lockedBuffer is a bytes.Buffer safe for concurrent use that broadcasts
// each write.
type lockedBuffer struct {
	broadcaster
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	defer b.broadcast()
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startWatch runs Watch with cfg until the test ends, recording what it
// reports and logs.
func startWatch(t *testing.T, cfg Config) *recorder {
	t.Helper()
	rec := &recorder{}
	cfg.Logger = slog.New(slog.NewTextHandler(&rec.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.OnChange = rec.onChange
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Watch = %v, want nil after cancel", err)
			}
		case <-time.After(waitTimeout):
			t.Errorf("Watch did not return within %v of cancel", waitTimeout)
		}
		if t.Failed() {
			t.Logf("reports: %v\nlbaddr log:\n%s", rec.all(), rec.log.String())
		}
	})
	return rec
}

// fakeResolver answers from a table that tests change, counting lookups.
type fakeResolver struct {
	broadcaster
	mu      sync.Mutex
	answers map[string][]netip.Addr
	errs    map[string]error
	calls   map[string]int
}

func newFakeResolver() *fakeResolver {
	return &fakeResolver{answers: map[string][]netip.Addr{}, errs: map[string]error{}, calls: map[string]int{}}
}

func (r *fakeResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	r.mu.Lock()
	r.calls[host]++
	addrs, err := r.answers[host], r.errs[host]
	r.mu.Unlock()
	defer r.broadcast()
	if network != "ip" {
		return nil, fmt.Errorf("network %q, want ip", network)
	}
	if err != nil {
		return nil, err
	}
	if addrs == nil {
		return nil, errors.New("no such host")
	}
	return addrs, nil
}

func (r *fakeResolver) set(host string, err error, addrs ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs[host] = err
	r.answers[host] = nil
	for _, a := range addrs {
		r.answers[host] = append(r.answers[host], netip.MustParseAddr(a))
	}
}

func (r *fakeResolver) callCount(host string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls[host]
}

// fakeCluster is a fake dynamic client whose watches tests can take over.
type fakeCluster struct {
	broadcaster
	client *dynamicfake.FakeDynamicClient

	mu      sync.Mutex
	lists   int
	watches int
	// scripted are handed out by the next watches, in order, before
	// watches of the fake's object tracker.
	scripted []*watch.FakeWatcher
}

func newFakeCluster(objs ...runtime.Object) *fakeCluster {
	c := &fakeCluster{client: dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{servicesResource(): "ServiceList"}, objs...)}
	c.client.PrependReactor("list", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
		c.mu.Lock()
		c.lists++
		c.mu.Unlock()
		c.broadcast()
		return false, nil, nil
	})
	// Registers the tracker's watch before counting it, so that a test
	// that waited for the count cannot change an object unseen.
	c.client.PrependWatchReactor("services", func(action k8stesting.Action) (bool, watch.Interface, error) {
		defer c.broadcast()
		c.mu.Lock()
		defer c.mu.Unlock()
		c.watches++
		if len(c.scripted) > 0 {
			w := c.scripted[0]
			c.scripted = c.scripted[1:]
			return true, w, nil
		}
		w, err := c.client.Tracker().Watch(action.GetResource(), action.GetNamespace())
		return true, w, err
	})
	return c
}

func (c *fakeCluster) counts() (lists, watches int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lists, c.watches
}

// script makes the next watch one the test drives.
func (c *fakeCluster) script() *watch.FakeWatcher {
	w := watch.NewFakeWithChanSize(10, false)
	c.mu.Lock()
	c.scripted = append(c.scripted, w)
	c.mu.Unlock()
	return w
}

func (c *fakeCluster) services() interface {
	UpdateStatus(context.Context, *unstructured.Unstructured, metav1.UpdateOptions) (*unstructured.Unstructured, error)
	Delete(context.Context, string, metav1.DeleteOptions, ...string) error
} {
	return c.client.Resource(servicesResource()).Namespace("kube-public")
}

func (c *fakeCluster) setIngress(t *testing.T, ingress ...any) {
	t.Helper()
	svc := newService([]any{udp(41000, int64(testRelayPort))}, ingress)
	if _, err := c.services().UpdateStatus(t.Context(), svc, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update status: %v", err)
	}
}

func TestWatchResolvesHostnames(t *testing.T) {
	cluster := newFakeCluster(newService([]any{udp(41000, int64(testRelayPort))}, []any{ingressHost("nlb.example")}))
	resolver := newFakeResolver()
	resolver.set("nlb.example", nil, "192.0.2.2", "::ffff:192.0.2.1", "2001:db8::1")
	rec := startWatch(t, Config{
		Client: cluster.client, Namespace: "kube-public", Name: "tsrelay", RelayPort: testRelayPort,
		Resolver: resolver, ResolveInterval: 20 * time.Millisecond,
	})

	first := []Endpoint{ep("192.0.2.1:41000", SourceDNS), ep("192.0.2.2:41000", SourceDNS), ep("[2001:db8::1]:41000", SourceDNS)}
	rec.waitFound(t, first...)
	if got := rec.all(); len(got) != 1 {
		t.Fatalf("reports = %v, want only %v (no empty set before the first answer)", got, first)
	}

	// Failures keep the last good answer and are reported once.
	resolver.set("nlb.example", errors.New("server misbehaving"))
	calls := resolver.callCount("nlb.example")
	waitFor(t, &resolver.broadcaster, "three failed lookups", func() bool {
		return resolver.callCount("nlb.example") >= calls+3
	})
	if got := rec.all(); len(got) != 1 {
		t.Errorf("reports after failed lookups = %v, want only the first", got)
	}
	if n := strings.Count(rec.log.String(), "resolve load-balancer hostname failed"); n != 1 {
		t.Errorf("logged %d resolve failures, want 1 per failure streak", n)
	}

	// A new answer is reported after the interval.
	resolver.set("nlb.example", nil, "192.0.2.3")
	rec.waitFound(t, ep("192.0.2.3:41000", SourceDNS))
	if !strings.Contains(rec.log.String(), "load-balancer hostname resolves again") {
		t.Errorf("log does not say the hostname resolves again")
	}

	// A hostname that never resolves contributes nothing, and says why.
	resolver.set("broken.example", errors.New("no such host"))
	cluster.setIngress(t, ingressHost("broken.example"))
	rec.waitWhy(t, "load-balancer hostname broken.example resolved to no address: no such host")

	// IPs and hostnames together; the hostname's duplicate of an IP is
	// reported once, as service.
	resolver.set("nlb.example", nil, "192.0.2.3", "192.0.2.50")
	cluster.setIngress(t, ingressIP("192.0.2.50"), ingressHost("nlb.example"))
	rec.waitFound(t, ep("192.0.2.3:41000", SourceDNS), ep("192.0.2.50:41000", SourceService))

	if err := cluster.services().Delete(t.Context(), "tsrelay", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitWhy(t, "Service kube-public/tsrelay not found")

	// No report repeats the one before it.
	reports := rec.all()
	for i := 1; i < len(reports); i++ {
		if slices.Equal(reports[i].found, reports[i-1].found) && reports[i].why == reports[i-1].why {
			t.Errorf("report %d repeats the one before: %v", i, reports[i])
		}
	}
}

// TestWatchResumes checks that the watcher lists again after "410 Gone"
// without complaint, and after another watch error, and follows the Service
// afterwards.
func TestWatchResumes(t *testing.T) {
	cluster := newFakeCluster(newService([]any{udp(41000, int64(testRelayPort))}, []any{ingressIP("192.0.2.10")}))
	gone := cluster.script()
	rec := startWatch(t, Config{Client: cluster.client, Namespace: "kube-public", Name: "tsrelay", RelayPort: testRelayPort})
	rec.waitFound(t, ep("192.0.2.10:41000", SourceService))
	waitFor(t, &cluster.broadcaster, "the first watch", func() bool { _, w := cluster.counts(); return w >= 1 })

	broken := cluster.script()
	gone.Error(&metav1.Status{Status: metav1.StatusFailure, Code: 410, Reason: metav1.StatusReasonExpired, Message: "too old resource version"})
	waitFor(t, &cluster.broadcaster, "a new list and watch after 410", func() bool {
		l, w := cluster.counts()
		return l >= 2 && w >= 2
	})
	if log := rec.log.String(); strings.Contains(log, "level=WARN") {
		t.Errorf("410 Gone logged a warning:\n%s", log)
	}

	broken.Error(&metav1.Status{Status: metav1.StatusFailure, Code: 500, Reason: metav1.StatusReasonInternalError, Message: "etcd is sad"})
	waitFor(t, &cluster.broadcaster, "a new list and watch after an error", func() bool {
		l, w := cluster.counts()
		return l >= 3 && w >= 3
	})
	cluster.setIngress(t, ingressIP("192.0.2.11"))
	rec.waitFound(t, ep("192.0.2.11:41000", SourceService))
	// An error inside a watch is logged by client-go's reflector itself,
	// through klog, which cmd/relay routes into the relay's log.
}

func TestWatchBadConfig(t *testing.T) {
	err := Watch(t.Context(), Config{ResolveInterval: -time.Second})
	if err == nil {
		t.Fatal("Watch with an empty Config succeeded")
	}
	for _, want := range []string{"no Kubernetes client", "empty Service namespace", "empty Service name", "relay port 0", "negative resolve interval", "no OnChange"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Watch error %q does not say %q", err, want)
		}
	}
}

func TestCheck(t *testing.T) {
	tests := []struct {
		name    string
		err     error // returned by the fake API server; nil: get the Service
		objs    []runtime.Object
		wantErr string // "" means no error
	}{
		{name: "found", objs: []runtime.Object{newService(nil, nil)}},
		{name: "not found"},
		{
			name:    "forbidden",
			err:     apierrors.NewForbidden(schema.GroupResource{Resource: "services"}, "tsrelay", errors.New("RBAC says no")),
			wantErr: `forbidden to "get" services in kube-public; the Role needs "get", "list" and "watch" on the Service tsrelay (resourceNames): services "tsrelay" is forbidden: RBAC says no`,
		},
		{
			name:    "other error",
			err:     apierrors.NewServiceUnavailable("try later"),
			wantErr: "get Service kube-public/tsrelay: try later",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cluster := newFakeCluster(tt.objs...)
			if tt.err != nil {
				cluster.client.PrependReactor("get", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
					return true, nil, tt.err
				})
			}
			err := Check(t.Context(), Config{Client: cluster.client, Namespace: "kube-public", Name: "tsrelay"})
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Check = %v, want nil", err)
			case tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr):
				t.Errorf("Check = %v, want %s", err, tt.wantErr)
			case tt.err != nil && !errors.Is(err, tt.err):
				t.Errorf("Check = %v, does not wrap %v", err, tt.err)
			}
		})
	}
}
