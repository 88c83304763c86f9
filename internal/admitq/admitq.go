// Package admitq keeps the connections a server has accepted but not yet
// admitted (not yet sent a whole request, not yet passed an admission
// check), oldest first, so that a server at its cap can close the oldest
// of them to make room for a new one instead of making the new one wait.
//
// Why: a server that caps its connections and makes new ones wait (as
// netutil.LimitListener does) lets anyone who holds the cap with
// connections that never finish their request keep everyone else out
// until the held ones time out: the kubelet's probe of the health port
// and a tailnet member on the DERP port alike. Closing the oldest
// unadmitted connection keeps the count bounded and lets a new
// connection in at once; the oldest had the longest to finish, and a
// real client finishes in a few round trips. Both the health port
// (internal/httpserve) and the DERP port (derpregion) use it.
package admitq

import (
	"container/list"
	"sync"
)

// Queue is a bounded set of waiting connections, oldest first. It is safe
// for concurrent use.
type Queue struct {
	max int

	mu sync.Mutex
	l  list.List // of *Ticket, oldest first
}

// New returns a Queue that holds at most n tickets (at least one).
func New(n int) *Queue {
	return &Queue{max: max(1, n)}
}

// Ticket is one connection's place in a Queue.
type Ticket struct {
	q     *Queue
	elem  *list.Element // nil once left or evicted; guarded by q.mu
	evict func()
}

// Join gives a new connection a place. With the queue full, the oldest
// ticket loses its place and its evict is called (after Join's lock is
// released, before Join returns), which should close that connection.
func (q *Queue) Join(evict func()) *Ticket {
	t := &Ticket{q: q, evict: evict}
	q.mu.Lock()
	var oldest *Ticket
	if q.l.Len() >= q.max {
		oldest = q.removeOldestLocked()
	}
	t.elem = q.l.PushBack(t)
	q.mu.Unlock()
	if oldest != nil {
		oldest.evict()
	}
	return t
}

// EvictOldest evicts the oldest ticket, calling its evict, and reports
// whether there was one.
func (q *Queue) EvictOldest() bool {
	q.mu.Lock()
	oldest := q.removeOldestLocked()
	q.mu.Unlock()
	if oldest == nil {
		return false
	}
	oldest.evict()
	return true
}

func (q *Queue) removeOldestLocked() *Ticket {
	e := q.l.Front()
	if e == nil {
		return nil
	}
	t := q.l.Remove(e).(*Ticket)
	t.elem = nil
	return t
}

// Len is the number of tickets in the queue.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.l.Len()
}

// Leave gives up t's place (the connection was admitted, or closed) and
// reports whether t still had one: false once it left or was evicted, so
// a caller can do its own accounting exactly once.
func (t *Ticket) Leave() bool {
	t.q.mu.Lock()
	defer t.q.mu.Unlock()
	if t.elem == nil {
		return false
	}
	t.q.l.Remove(t.elem)
	t.elem = nil
	return true
}
