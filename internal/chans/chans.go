// Package chans holds the two channel idioms the relay's loops share: a
// wake-up that never blocks the waker, and a mailbox that keeps only the
// latest value.
package chans

// Poke sends on ch without blocking. ch must have a buffer of one: when a
// wake-up is pending already, this one is folded into it, since the reader
// looks at the current state rather than counting wake-ups.
func Poke(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Replace puts v in ch, a mailbox with a buffer of one, dropping a value
// that is still waiting there, so the reader always gets the latest and the
// writer never blocks for long. It suits one writer: with several, a
// writer may wait until the reader takes another's value.
func Replace[T any](ch chan T, v T) {
	for {
		select {
		case ch <- v:
			return
		default:
		}
		select {
		case <-ch: // stale: v supersedes it
		default:
		}
	}
}
