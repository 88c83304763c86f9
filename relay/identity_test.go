package relay

import (
	"errors"
	"log/slog"
	"testing"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/tsrelay/tsrelay/kubestate"
	"github.com/tsrelay/tsrelay/lease"
)

// TestFlushStateOnlyWhileHeld: state a failed write left pending is
// written on shutdown while this process holds the Lease, and never once
// it does not: another process may own the Secret by then.
func TestFlushStateOnlyWhileHeld(t *testing.T) {
	for _, held := range []bool{false, true} {
		client := fake.NewSimpleDynamicClient(runtime.NewScheme())
		store, err := kubestate.New(t.Context(), nil, client, "ns", "state")
		if err != nil {
			t.Fatal(err)
		}
		// The API server refuses secret updates for a while: the write
		// stays pending.
		var down, updates int
		client.PrependReactor("update", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
			updates++
			if down > 0 {
				down--
				return true, nil, errors.New("test: API server unreachable")
			}
			return false, nil, nil
		})
		down = 1
		if err := store.WriteState("_machinekey", []byte("k")); err == nil {
			t.Fatal("WriteState succeeded while updates fail")
		}
		l, err := lease.New(lease.Config{Client: client, Namespace: "ns", Name: "state", Identity: "pod"})
		if err != nil {
			t.Fatal(err)
		}
		if held {
			if err := l.Acquire(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		before := updates
		flushState(store, &identityGuard{lease: l, logger: slog.New(slog.DiscardHandler)}, slog.New(slog.DiscardHandler))
		_, pending := store.Unpersisted()
		switch {
		case held && (updates == before || pending != 0):
			t.Errorf("Lease held: flush made %d updates, %d keys still pending; want the pending key written", updates-before, pending)
		case !held && updates != before:
			t.Errorf("Lease not held: flush made %d updates; want none", updates-before)
		}
	}
}
