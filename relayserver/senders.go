package relayserver

import (
	"time"

	"tailscale.com/tstime/rate"
	"tailscale.com/types/key"
	"tailscale.com/util/lru"
)

// Rejected is published on the node's event bus when a sender's allocation
// request is rejected, at most once per LogInterval per sender.
type Rejected struct {
	// From is the sender's node key and Disco its disco key, as the DERP
	// server and the sealed box attest.
	From  key.NodePublic
	Disco key.DiscoPublic
	// Reason is why this request was rejected.
	Reason Reason
	// Suppressed counts the sender's rejections since the last Rejected
	// that were not published.
	Suppressed int
}

// sender is what the extension remembers about one node key.
type sender struct {
	alloc      *rate.Limiter
	lastReport time.Time
	suppressed int
}

// senders holds per-sender limits, bounded to maxSenders (least recently
// seen forgotten first). It is not safe for concurrent use.
type senders struct {
	c lru.Cache[key.NodePublic, *sender]
}

func newSenders() *senders {
	return &senders{c: lru.Cache[key.NodePublic, *sender]{MaxEntries: maxSenders}}
}

func (s *senders) get(k key.NodePublic) *sender {
	v, ok := s.c.GetOk(k)
	if !ok {
		v = &sender{alloc: rate.NewLimiter(AllocRate, AllocBurst)}
		s.c.Set(k, v)
	}
	return v
}

// allowAlloc reports whether k may allocate now, and takes a token if so.
func (s *senders) allowAlloc(k key.NodePublic) bool {
	return s.get(k).alloc.Allow()
}

// report records a rejection of k's request at now and reports whether to
// publish it, with the count of rejections suppressed before it.
func (s *senders) report(k key.NodePublic, now time.Time) (publish bool, suppressed int) {
	v := s.get(k)
	if !v.lastReport.IsZero() && now.Sub(v.lastReport) < LogInterval {
		v.suppressed++
		return false, 0
	}
	suppressed, v.suppressed, v.lastReport = v.suppressed, 0, now
	return true, suppressed
}
