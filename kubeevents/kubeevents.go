// Package kubeevents records Kubernetes Events about the relay's own pod, for
// the moments an operator looks for in `kubectl describe pod`: state loaded
// or failed to load, login needed, relay bound or lost, endpoints changed.
// The relay records one at each such transition, never one per state write.
//
// Events are deduplicated as client-go's EventCorrelator does, simplified: a
// repeat of an Event this Recorder posted before (same type, reason and
// message) raises that Event's count and lastTimestamp with a patch instead
// of creating another Event, and repeats recorded before the first is posted
// fold into it. A token bucket limits posts and the queue is bounded, so even
// a caller in a tight loop costs the API server a few writes, not one per
// call.
//
// It writes core/v1 Events with client-go's dynamic client. client-go's
// tools/record package would do the deduplication for us, but it links the
// typed core/v1 client and with it every type in k8s.io/api, which would
// take the binary over its size budget.
package kubeevents

import (
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/utils/lru"

	"github.com/tsrelay/tsrelay/internal/chans"
)

const (
	// maxMessageBytes caps an Event's message. The core/v1 API sets no
	// limit, but events.k8s.io/v1 caps its note at 1024, and an operator
	// reads the message on one line of `kubectl describe pod`.
	maxMessageBytes = 1024

	// queueSize bounds the Events waiting to be posted. The token bucket
	// lets at most bucketBurst in at once, so the queue fills only when
	// posts stall (an unreachable API server) or Run is not running.
	queueSize = 100

	// bucketBurst and bucketRefill set the token bucket on posts (client-go's
	// util/flowcontrol, which its REST client links anyway): queueing an
	// Event takes a token, and each queued Event becomes one create or one
	// patch (plus at most one retry). client-go's spam filter allows a
	// burst of 25 and then one Event per 5 minutes per object and type,
	// tuned for kubelets and controllers that emit many kinds of Events.
	// We keep its burst, which covers a start (state loaded, login, relay
	// bound, endpoints) and a flapping episode, but refill every 10 s: the
	// relay's transitions are rare and each matters (a relay lost two
	// minutes after a burst must show, not wait out a mute), and 6 writes a
	// minute are nothing to an API server.
	bucketBurst  = 25
	bucketRefill = 10 * time.Second

	// dedupKeys is how many distinct Events (type, reason, message) the
	// Recorder remembers in order to patch repeats; the least recently
	// posted is forgotten first. The relay has a handful of reasons; the
	// messages that vary (endpoint lists) rarely repeat after 64 others.
	dedupKeys = 64

	// postTimeout bounds one API call.
	postTimeout = 10 * time.Second

	// retryDelay is the pause before the one retry of a post that failed
	// in a way another try may fix (timeouts, 5xx, connection errors).
	retryDelay = time.Second

	// flushTimeout is how long Run keeps posting after its ctx is done, so
	// that Events recorded on the way down (StateLoadFailed, say) still reach the API
	// server without holding up shutdown for long.
	flushTimeout = 2 * time.Second

	// component names tsrelay as the source of its Events.
	component = "tsrelay"

	// rbacHint says what a Role must grant for Events.
	rbacHint = `the Role needs "create" and "patch" on events`
)

// Pod identifies the object Events are about, from the downward API:
// POD_NAME, POD_NAMESPACE and POD_UID.
type Pod struct {
	Name      string
	Namespace string
	// UID is optional, but `kubectl describe pod` shows only Events whose
	// involvedObject carries the pod's UID; `kubectl get events` shows them
	// all.
	UID string
}

// Recorder posts Events about one pod. Normal and Warning are cheap,
// never block on the API server (Run does the posting), and are safe for
// concurrent use. A nil *Recorder is valid and records nothing, for a relay
// outside a cluster.
type Recorder struct {
	events     dynamic.ResourceInterface // events in the pod's namespace
	pod        Pod
	logger     *slog.Logger
	now        func() time.Time // time.Now; tests set a fake clock
	retryDelay time.Duration

	// wake has room for one value: sent (without blocking) when an Event
	// is queued, received by Run.
	wake chan struct{}

	// limiter is the token bucket on posts, reading the clock in now.
	limiter flowcontrol.PassiveRateLimiter

	mu       sync.Mutex
	queue    []*pending       // oldest first
	queued   map[key]*pending // the queue by key, to fold repeats
	dropping bool             // in a streak of drops, of which the first was logged
	stopped  bool             // Run has returned: nothing will be posted

	running atomic.Bool // Run has been called

	// Owned by the goroutine in Run.
	posted    *lru.Cache // key to *postedEvent, the least recently posted forgotten first
	lastNanos int64      // the timestamp in the last Event name, kept unique
	failing   bool       // in a streak of failures, of which the first was logged

	// failed counts Events the API server did not take, after at most one
	// retry; dropped counts Events never posted (over the rate limit or
	// the queue bound, or left when Run stopped). Both are logged.
	failed, dropped atomic.Uint64
}

// key is what makes two Events the same Event, as in client-go's
// EventCorrelator (which adds the source and the object, fixed here).
type key struct {
	eventType, reason, message string
}

// pending is an Event waiting to be posted, with the repeats folded into it.
type pending struct {
	key
	first, last time.Time // when it was first and last recorded
	n           int64     // times recorded
}

// postedEvent is an Event this Recorder created, for patching repeats.
type postedEvent struct {
	name  string
	count int64 // the count the API server holds
}

// New returns a Recorder that posts Events about pod with client, naming
// "tsrelay" as their source. Call Run to post them. It
// returns nil, a Recorder that records nothing, if client is nil or if pod
// lacks a name or namespace (logged: they come from the downward API).
func New(client dynamic.Interface, pod Pod, logger *slog.Logger) *Recorder {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if client == nil {
		return nil
	}
	if pod.Name == "" || pod.Namespace == "" {
		logger.Warn("kube events off: set POD_NAME and POD_NAMESPACE from the downward API",
			"pod", pod.Name, "namespace", pod.Namespace)
		return nil
	}
	if pod.UID == "" {
		logger.Warn("kube events: POD_UID is not set, so `kubectl describe pod` will not show them (`kubectl get events` will)",
			"pod", pod.Namespace+"/"+pod.Name)
	}
	r := &Recorder{
		events:     client.Resource(eventsResource()).Namespace(pod.Namespace),
		pod:        pod,
		logger:     logger,
		now:        time.Now,
		retryDelay: retryDelay,
		wake:       make(chan struct{}, 1),
		queued:     make(map[key]*pending),
		posted:     lru.New(dedupKeys),
	}
	// The limiter calls r.now at each admission, so a test's fake clock,
	// set after New, drives the bucket too.
	r.limiter = flowcontrol.NewTokenBucketPassiveRateLimiterWithClock(
		float32(time.Second)/float32(bucketRefill), bucketBurst, nowClock(func() time.Time { return r.now() }))
	return r
}

// nowClock is a now function as the clock.PassiveClock that client-go's
// rate limiters read.
type nowClock func() time.Time

// Now returns the time.
func (c nowClock) Now() time.Time { return c() }

// Since returns the time elapsed since t.
func (c nowClock) Since(t time.Time) time.Duration { return c().Sub(t) }

// Normal queues an Event of type Normal with reason (UpperCamelCase, such
// as "RelayBound") and message, which is cut to 1024 bytes.
func (r *Recorder) Normal(reason, message string) { r.record("Normal", reason, message) }

// Warning queues an Event of type Warning with reason (UpperCamelCase, such
// as "RelayNotBound") and message, which is cut to 1024 bytes.
func (r *Recorder) Warning(reason, message string) { r.record("Warning", reason, message) }

// record queues an Event, or folds it into the same Event already queued,
// or drops it. It logs the first drop of a streak.
func (r *Recorder) record(eventType, reason, message string) {
	if r == nil {
		return
	}
	k := key{eventType, reason, truncate(message, maxMessageBytes)}
	now := r.now()

	r.mu.Lock()
	if p := r.queued[k]; p != nil {
		p.n++
		p.last = now
		r.mu.Unlock()
		return
	}
	why := r.admit()
	if why == "" {
		p := &pending{key: k, first: now, last: now, n: 1}
		r.queue = append(r.queue, p)
		r.queued[k] = p
	}
	wasDropping := r.dropping
	r.dropping = why != ""
	r.mu.Unlock()

	if why != "" {
		r.dropped.Add(1)
		if !wasDropping {
			r.logger.Warn("kube event dropped; further drops are not logged until one is queued",
				"why", why, "type", eventType, "reason", reason)
		}
		return
	}
	if wasDropping {
		r.logger.Info("kube events queued again after drops", "dropped_total", r.dropped.Load())
	}
	chans.Poke(r.wake) // folded into a wake-up Run has pending, if any
}

// admit takes a token for a new Event, or says why it cannot be queued.
// The caller holds mu.
func (r *Recorder) admit() (why string) {
	if r.stopped {
		return "recorder stopped"
	}
	if len(r.queue) >= queueSize {
		return "queue full"
	}
	if !r.limiter.TryAccept() {
		return "rate limited"
	}
	return ""
}

// truncate returns s cut to at most n bytes without splitting a UTF-8
// sequence.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	// Back up over at most UTFMax-1 continuation bytes to a rune start.
	for i := n; i > n-utf8.UTFMax && i > 0; i-- {
		if utf8.RuneStart(s[i]) {
			cut = i
			break
		}
	}
	return s[:cut]
}

// eventsResource names core/v1 Events for the dynamic client.
func eventsResource() schema.GroupVersionResource {
	return schema.GroupVersionResource{Version: "v1", Resource: "events"}
}
