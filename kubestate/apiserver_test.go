package kubestate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"tailscale.com/ipn"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// TestAgainstAPIServer runs the Store against a real kube-apiserver (etcd,
// RBAC, optimistic concurrency, size limits and all), acting as a
// ServiceAccount through a kubeconfig, as the relay does outside a pod. Each
// subtest has its own namespace on one shared control plane.
func TestAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)

	// kubeconfigFor returns a namespace in which ServiceAccount "relay" is
	// granted rules, and points KUBECONFIG at a kubeconfig with its token.
	kubeconfigFor := func(t *testing.T, rules ...rbacv1.PolicyRule) (ns string) {
		ns = srv.NamespaceForTest(t, nil)
		t.Setenv("KUBECONFIG", srv.KubeconfigForTest(t, ns, "relay"))
		if len(rules) > 0 {
			srv.GrantForTest(t, ns, "relay", rules...)
		}
		return ns
	}
	// The Role the manifests grant (see manifests/rbac.yaml).
	relayRules := []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{"state"}, Verbs: []string{"get", "update", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
	}
	secretData := func(t *testing.T, ns string) map[string][]byte {
		t.Helper()
		sec, err := admin.CoreV1().Secrets(ns).Get(t.Context(), "state", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get secret as admin: %v", err)
		}
		return sec.Data
	}

	t.Run("CreatesMissingSecretAndReadsBack", func(t *testing.T) {
		ns := kubeconfigFor(t, relayRules...)
		s1, err := openStore(t) // namespace from the kubeconfig context
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		sec, err := admin.CoreV1().Secrets(ns).Get(t.Context(), "state", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("secret not created: %v", err)
		}
		if got := sec.Labels[managedByLabel]; got != managedByValue {
			t.Errorf("label %s = %q, want %q", managedByLabel, got, managedByValue)
		}
		if _, err := s1.ReadState("_machinekey"); !errors.Is(err, ipn.ErrStateNotExist) {
			t.Errorf("ReadState on an empty secret: err = %v, want ErrStateNotExist", err)
		}
		want := map[ipn.StateKey][]byte{
			"_machinekey":      []byte("privkey:0123"),
			"_current-profile": []byte("profile-a"),
			"profile-a":        bytes.Repeat([]byte{0, 0xff, '\n'}, 100), // binary-safe
		}
		for k, v := range want {
			if err := s1.WriteState(k, v); err != nil {
				t.Fatalf("WriteState(%q): %v", k, err)
			}
		}
		if got := len(secretData(t, ns)); got != len(want) {
			t.Errorf("secret has %d keys, want %d", got, len(want))
		}

		s2, err := openStore(t) // a restarted pod
		if err != nil {
			t.Fatalf("second New: %v", err)
		}
		for k, v := range want {
			got, err := s2.ReadState(k)
			if err != nil || !bytes.Equal(got, v) {
				t.Errorf("new store: ReadState(%q) = %q, %v; want %q", k, got, err, v)
			}
		}
		if err := s2.WriteState("_machinekey", nil); err != nil {
			t.Fatalf("delete key: %v", err)
		}
		if got := len(secretData(t, ns)); got != len(want)-1 {
			t.Errorf("after delete the secret has %d keys, want %d", got, len(want)-1)
		}
	})

	t.Run("StaleWriterRetriesAndKeepsOthersKeys", func(t *testing.T) {
		kubeconfigFor(t, relayRules...)
		a, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		b, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		// a's write makes b's copy stale: b's Update must conflict once,
		// then succeed on a fresh copy that still has a's key.
		if err := a.WriteState("from-a", []byte("1")); err != nil {
			t.Fatal(err)
		}
		if err := b.WriteState("from-b", []byte("2")); err != nil {
			t.Fatal(err)
		}
		if got := b.Stats().Conflicts; got != 1 {
			t.Errorf("b saw %d conflicts, want 1", got)
		}
		c, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range []ipn.StateKey{"from-a", "from-b"} {
			if _, err := c.ReadState(k); err != nil {
				t.Errorf("key %q lost: %v", k, err)
			}
		}
	})

	t.Run("ConcurrentWritersLoseNoUpdate", func(t *testing.T) {
		kubeconfigFor(t, relayRules...)
		const writers, keysEach = 2, 25
		stores := make([]*Store, writers)
		for i := range stores {
			s, err := openStore(t)
			if err != nil {
				t.Fatal(err)
			}
			stores[i] = s
		}
		var wg sync.WaitGroup
		errs := make(chan error, writers*keysEach)
		for i, s := range stores {
			wg.Go(func() {
				for j := range keysEach {
					k := ipn.StateKey(fmt.Sprintf("w%d-k%02d", i, j))
					if err := s.WriteState(k, []byte(k)); err != nil {
						errs <- err
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("concurrent write: %v", err)
		}
		check, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		var conflicts uint64
		for i, s := range stores {
			conflicts += s.Stats().Conflicts
			for j := range keysEach {
				k := ipn.StateKey(fmt.Sprintf("w%d-k%02d", i, j))
				if got, err := check.ReadState(k); err != nil || string(got) != string(k) {
					t.Errorf("key %q = %q, %v after concurrent writes", k, got, err)
				}
			}
		}
		t.Logf("%d writes by %d stores, %d conflicts retried", writers*keysEach, writers, conflicts)
	})

	t.Run("SizeLimit", func(t *testing.T) {
		ns := kubeconfigFor(t, relayRules...)
		s, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		// Up to the limit, the real API server accepts the write.
		if err := s.WriteState("big", make([]byte, maxSecretSize-10)); err != nil {
			t.Fatalf("write just under the 1 MiB limit: %v", err)
		}
		err = s.WriteState("more", make([]byte, 11))
		if err == nil {
			t.Fatal("write past the 1 MiB limit succeeded")
		}
		if !strings.Contains(err.Error(), "over the Kubernetes limit of 1048576 bytes") || !strings.Contains(err.Error(), `"more"`) {
			t.Errorf("error does not name the key and the limit: %v", err)
		}
		if got := s.Stats().Failures; got != 1 {
			t.Errorf("Failures = %d, want 1", got)
		}
		if _, err := s.ReadState("more"); !errors.Is(err, ipn.ErrStateNotExist) {
			t.Errorf("rejected key is readable from memory: %v", err)
		}
		if got := len(secretData(t, ns)); got != 1 {
			t.Errorf("secret has %d keys, want 1", got)
		}
	})

	t.Run("MissingRBAC", func(t *testing.T) {
		secrets := func(verbs ...string) rbacv1.PolicyRule {
			return rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: verbs}
		}
		for _, tc := range []struct {
			name     string
			rules    []rbacv1.PolicyRule
			preexist bool
			verb     string
		}{
			{"NoRole", nil, false, "get"},
			{"NoCreate", []rbacv1.PolicyRule{secrets("get", "update")}, false, "create"},
			{"NoUpdate", []rbacv1.PolicyRule{secrets("get", "create")}, false, "update"},
			{"NoUpdateOnExisting", []rbacv1.PolicyRule{secrets("get")}, true, "update"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ns := kubeconfigFor(t, tc.rules...)
				if tc.preexist {
					createSecretAsAdmin(t, admin.CoreV1().Secrets(ns), "state")
				}
				_, err := openStore(t)
				if err == nil {
					t.Fatal("New succeeded without the permission")
				}
				want := fmt.Sprintf(`forbidden to %q secrets; the Role needs verbs`, tc.verb)
				if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), ns+"/state") {
					t.Errorf("error does not name the verb, resource and secret:\n got: %v\nwant: %s", err, want)
				}
			})
		}
	})

	// Last: it stops and restarts the shared API server.
	t.Run("WriteAfterDeleteRecreatesEverything", func(t *testing.T) {
		// The Secret is deleted; the next write is no outage to wait
		// out: the Secret is created again at once, holding the whole
		// state from memory, not only the key being written.
		ns := kubeconfigFor(t, relayRules...)
		s, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		mustWriteState(t, s, "_machinekey", "machine-1")
		mustWriteState(t, s, "profile-a", "node-key-1")
		if err := admin.CoreV1().Secrets(ns).Delete(t.Context(), "state", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := s.WriteState("_current-profile", []byte("profile-a")); err != nil {
			t.Fatalf("WriteState after the Secret was deleted: %v", err)
		}
		if since, n := s.Unpersisted(); !since.IsZero() || n != 0 {
			t.Errorf("Unpersisted() = %v, %d after the write; want nothing pending", since, n)
		}
		got := secretData(t, ns)
		for k, v := range map[string]string{"_machinekey": "machine-1", "profile-a": "node-key-1", "_current-profile": "profile-a"} {
			if string(got[k]) != v {
				t.Errorf("re-created secret %s = %q, want %q", k, got[k], v)
			}
		}
	})

	t.Run("DeletedSecretIsRecreatedAtOnce", func(t *testing.T) {
		// Nothing writes after the delete: the watch alone must notice.
		ns := kubeconfigFor(t, relayRules...)
		s, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		recreated := make(chan int, 1)
		s.OnRecreated(func(keys int) { recreated <- keys })
		mustWriteState(t, s, "_machinekey", "machine-1")
		mustWriteState(t, s, "profile-a", "node-key-1")
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- s.Watch(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
		// Whether the delete lands before the watch starts (its first
		// GET finds the Secret missing) or during it (a Deleted event),
		// the Secret must come back.
		wctx, wcancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer wcancel()
		if err := admin.CoreV1().Secrets(ns).Delete(t.Context(), "state", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		deleted := time.Now()
		select {
		case keys := <-recreated:
			if keys != 2 {
				t.Errorf("re-created with %d state keys, want 2", keys)
			}
		case <-wctx.Done():
			t.Fatal("the deleted Secret was not re-created")
		}
		t.Logf("re-created %v after the delete", time.Since(deleted).Round(time.Millisecond))
		got := secretData(t, ns)
		if string(got["_machinekey"]) != "machine-1" || string(got["profile-a"]) != "node-key-1" {
			t.Errorf("re-created secret = %q, want the state written before the delete", got)
		}
		if n := s.Stats().Recreated; n != 1 {
			t.Errorf("Stats().Recreated = %d, want 1", n)
		}
		// And a restart now keeps the identity.
		again, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		wantValues(t, again, map[ipn.StateKey]string{"_machinekey": "machine-1", "profile-a": "node-key-1"})
	})

	t.Run("WriteDuringOutageLandsAfterIt", func(t *testing.T) {
		ns := kubeconfigFor(t, relayRules...)
		s, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		runDone := make(chan error, 1)
		go func() { runDone <- s.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-runDone })
		mustWriteState(t, s, "_machinekey", "machine-1")

		srv.StopAPIServer()
		// The first login's node key, written while the API server is
		// away: tailscaled logs the error and carries on.
		err = s.WriteState("profile-a", []byte("node-key-1"))
		if err == nil || !strings.Contains(err.Error(), "written again in the background") {
			t.Fatalf("WriteState during the outage = %v, want an error saying it will be written again", err)
		}
		if since, n := s.Unpersisted(); since.IsZero() || n != 1 {
			t.Fatalf("Unpersisted() = %v, %d during the outage; want a time and 1 key", since, n)
		}
		if got, err := s.ReadState("profile-a"); err != nil || string(got) != "node-key-1" {
			t.Errorf("ReadState(profile-a) = %q, %v during the outage; want the pending value", got, err)
		}
		// A last try on shutdown fails too, and says what is at stake.
		fctx, fcancel := context.WithTimeout(t.Context(), 2*time.Second)
		if err := s.Flush(fctx); err == nil || !strings.Contains(err.Error(), "1 pending keys") {
			t.Errorf("Flush during the outage = %v, want an error counting the pending key", err)
		}
		fcancel()

		if err := srv.StartAPIServer(t.Context()); err != nil {
			t.Fatalf("restart kube-apiserver: %v", err)
		}
		back := time.Now()
		// No further write from tailscaled: Run alone must land it.
		wctx, wcancel := context.WithTimeout(t.Context(), time.Minute)
		defer wcancel()
		if err := tailnettest.WaitFor(wctx, 20*time.Millisecond, func() (bool, error) {
			since, _ := s.Unpersisted()
			return since.IsZero(), nil
		}); err != nil {
			t.Fatalf("pending state not written after the API server came back: %v", err)
		}
		t.Logf("caught up %v after the API server was ready again (retries %d)", time.Since(back).Round(time.Millisecond), s.Stats().Retries)
		if got := secretData(t, ns)["profile-a"]; string(got) != "node-key-1" {
			t.Errorf("secret profile-a = %q after catch-up, want node-key-1", got)
		}
		// A restart now keeps the identity.
		again, err := openStore(t)
		if err != nil {
			t.Fatal(err)
		}
		wantValues(t, again, map[ipn.StateKey]string{"_machinekey": "machine-1", "profile-a": "node-key-1"})
	})
}

func mustWriteState(t *testing.T, s *Store, id ipn.StateKey, v string) {
	t.Helper()
	if err := s.WriteState(id, []byte(v)); err != nil {
		t.Fatalf("WriteState(%q): %v", id, err)
	}
}

func wantValues(t *testing.T, s *Store, want map[ipn.StateKey]string) {
	t.Helper()
	for id, v := range want {
		if got, err := s.ReadState(id); err != nil || string(got) != v {
			t.Errorf("ReadState(%q) = %q, %v; want %q", id, got, err, v)
		}
	}
}

// openStore opens Secret "state" the way the relay does: a client from
// KUBECONFIG, the namespace from its context.
func openStore(t *testing.T) (*Store, error) {
	t.Helper()
	kc, err := kubeclient.New()
	if err != nil {
		t.Fatal(err)
	}
	return New(t.Context(), nil, kc.Dynamic, kc.Namespace, "state")
}

// createSecretAsAdmin creates an empty Secret, as a user who pre-creates the
// state Secret would.
func createSecretAsAdmin(t *testing.T, secrets typedcorev1.SecretInterface, name string) {
	t.Helper()
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if _, err := secrets.Create(t.Context(), sec, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create secret as admin: %v", err)
	}
}
