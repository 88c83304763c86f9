package admitq

import (
	"slices"
	"testing"
)

// TestQueue: a full queue evicts its oldest ticket, each ticket leaves or
// is evicted exactly once, and leaving makes room.
func TestQueue(t *testing.T) {
	q := New(2)
	var evicted []int
	join := func(i int) *Ticket { return q.Join(func() { evicted = append(evicted, i) }) }
	t0, t1 := join(0), join(1)
	if len(evicted) != 0 || q.Len() != 2 {
		t.Fatalf("two tickets in a queue of two: evicted %v, Len %d; want none, 2", evicted, q.Len())
	}
	t2 := join(2)
	if !slices.Equal(evicted, []int{0}) || q.Len() != 2 {
		t.Fatalf("third ticket: evicted %v, Len %d; want [0], 2", evicted, q.Len())
	}
	if t0.Leave() {
		t.Error("an evicted ticket left again")
	}
	if !t1.Leave() || t1.Leave() {
		t.Error("Leave of a waiting ticket, twice: want true, then false")
	}
	join(3) // room for it: t1 left
	if !slices.Equal(evicted, []int{0}) {
		t.Errorf("join after a leave evicted %v, want only [0]", evicted)
	}
	if !q.EvictOldest() || !slices.Equal(evicted, []int{0, 2}) {
		t.Errorf("EvictOldest: evicted %v, want [0 2]", evicted)
	}
	if t2.Leave() {
		t.Error("ticket 2 left after its eviction")
	}
	if !q.EvictOldest() || q.EvictOldest() || q.Len() != 0 {
		t.Errorf("EvictOldest until empty: Len %d, evicted %v", q.Len(), evicted)
	}
}
