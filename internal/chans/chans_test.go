package chans

import "testing"

func TestPoke(t *testing.T) {
	ch := make(chan struct{}, 1)
	Poke(ch)
	Poke(ch) // must not block with a wake-up pending
	<-ch
	select {
	case <-ch:
		t.Fatal("two pokes gave two wake-ups; want them folded into one")
	default:
	}
}

func TestReplace(t *testing.T) {
	ch := make(chan int, 1)
	for i := range 3 {
		Replace(ch, i) // must not block with a value waiting
	}
	if got := <-ch; got != 2 {
		t.Errorf("after Replace 0, 1, 2 the reader got %d, want the latest, 2", got)
	}
	select {
	case v := <-ch:
		t.Errorf("mailbox still holds %d after one read; want it empty", v)
	default:
	}
}
