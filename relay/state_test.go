package relay

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/kubeevents"
	"github.com/tsrelay/tsrelay/kubestate"
)

// TestUnpersistedStateReported writes state while the real API server is
// away and checks what a user sees: /readyz?verbose says since when the
// Secret lacks it, tsrelay_state_unpersisted_seconds is above 0, one
// warning is logged and a Warning Event recorded; and once the API server
// is back, with no further write, the Secret catches up, both clear, and
// the StatePersisted Event is on the pod.
func TestUnpersistedStateReported(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	ns := srv.NamespaceForTest(t, nil)
	client := srv.DynamicClientForTest(t, ns, "relay",
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"get", "create", "update"}},
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}},
	)
	var logs tailnettest.LogBuffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	ctx := t.Context()
	store, err := kubestate.New(ctx, logger, client, ns, "state")
	if err != nil {
		t.Fatal(err)
	}
	events := kubeevents.New(client, kubeevents.Pod{Name: "relay-0", Namespace: ns}, logger)
	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { events.Run(rctx) })
	wg.Go(func() { persistState(rctx, store, 20*time.Millisecond, events, logger) })
	t.Cleanup(func() { cancel(); wg.Wait() })

	h := nodeHandlers(Config{}, testRelay(t).status, nodeParts{node: &tailnetNode{}, store: store}, logger)
	verbose := func() (since *time.Time, metrics string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz?verbose", nil))
		st, err := decodeStatus(rec.Body.Bytes())
		if err != nil || st.State == nil || st.State.Secret != ns+"/state" {
			t.Fatalf("/readyz?verbose state = %+v, %v; want the Secret %s/state", st.State, err, ns)
		}
		rec = httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		return st.State.UnpersistedSince, rec.Body.String()
	}
	if since, m := verbose(); since != nil || !strings.Contains(m, "tsrelay_state_unpersisted_seconds 0\n") {
		t.Fatalf("before the outage: unpersistedSince %v, metrics unpersisted line missing or not 0", since)
	}

	srv.StopAPIServer()
	if err := store.WriteState("profile-a", []byte("node-key-1")); err == nil {
		t.Fatal("WriteState with the API server away succeeded")
	}
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	if err := tailnettest.WaitFor(wctx, 20*time.Millisecond, func() (bool, error) {
		return strings.Contains(logs.String(), "node state not in the Secret yet"), nil
	}); err != nil {
		t.Fatalf("no warning logged while state is unpersisted: %v", err)
	}
	since, m := verbose()
	if since == nil || strings.Contains(m, "tsrelay_state_unpersisted_seconds 0\n") || !strings.Contains(m, "tsrelay_state_unpersisted_seconds ") {
		t.Errorf("during the outage: unpersistedSince %v, want a time, and tsrelay_state_unpersisted_seconds above 0", since)
	}

	if err := srv.StartAPIServer(ctx); err != nil {
		t.Fatalf("restart kube-apiserver: %v", err)
	}
	if err := tailnettest.WaitFor(wctx, 50*time.Millisecond, func() (bool, error) {
		since, _ := verbose()
		return since == nil, nil
	}); err != nil {
		t.Fatalf("the Secret never caught up after the outage: %v", err)
	}
	if err := tailnettest.WaitFor(wctx, 100*time.Millisecond, func() (bool, error) {
		evs, err := admin.CoreV1().Events(ns).List(wctx, metav1.ListOptions{})
		if err != nil {
			return false, nil
		}
		seen := map[string]bool{}
		for _, e := range evs.Items {
			seen[e.Reason] = true
		}
		// StateNotPersisted was recorded during the outage; its post may
		// meet a just-restarted API server whose RBAC is not loaded yet
		// (Forbidden, not retried), which the recorder then logs.
		recorded := seen["StateNotPersisted"] || strings.Contains(logs.String(), "reason=StateNotPersisted")
		return recorded && seen["StatePersisted"], nil
	}); err != nil {
		t.Errorf("Event StatePersisted not on the pod, or StateNotPersisted never recorded: %v\nlog:\n%s", err, logs.String())
	}
}

// decodeStatus decodes a verbose /readyz body.
func decodeStatus(b []byte) (readyz.Status, error) {
	var st readyz.Status
	err := json.Unmarshal(b, &st)
	return st, err
}
