package kubeevents

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/client-go/kubernetes"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// TestAgainstAPIServer records Events on a real kube-apiserver (validation,
// merge patches, RBAC), acting as a ServiceAccount granted what the
// manifests grant for Events, and reads them back as an admin the way
// `kubectl describe pod` does. Each subtest has its own namespace on one
// shared control plane.
func TestAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)

	// recorderFor returns a Recorder for a made-up pod in a new namespace,
	// acting as ServiceAccount "relay" granted rules, running until the
	// test ends, with its log.
	recorderFor := func(t *testing.T, rules ...rbacv1.PolicyRule) (*Recorder, Pod, *logBuffer) {
		t.Helper()
		ns := srv.NamespaceForTest(t, nil)
		dc := srv.DynamicClientForTest(t, ns, "relay", rules...)
		// The pod need not exist: an Event's involvedObject is not
		// checked. Its UID looks like a real one.
		pod := Pod{Name: "tsrelay-5d8f7b9c4d-x2k9q", Namespace: ns, UID: string(uuid.NewUUID())}
		log := &logBuffer{}
		r := New(dc, pod, slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelDebug})))
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("kubeevents log:\n%s", log.String())
			}
		})
		startRun(t, r)
		return r, pod, log
	}
	// The rule manifests/rbac.yaml grants for Events.
	eventsRule := rbacv1.PolicyRule{
		APIGroups: []string{"", "events.k8s.io"}, Resources: []string{"events"}, Verbs: []string{"create", "patch"},
	}

	t.Run("DeduplicatedAsServiceAccount", func(t *testing.T) {
		r, pod, _ := recorderFor(t, eventsRule)
		r.Normal("StateLoaded", "state loaded from Secret tsrelay-state")
		r.Normal("RelayBound", "relay bound on udp :40000")
		waitDescribed(t, admin, pod, "2 Events", func(evs []corev1.Event) bool { return len(evs) == 2 })
		// Each repeat after the first is posted: a merge patch, which
		// needs the "patch" verb.
		for n := int32(2); n <= 3; n++ {
			r.Normal("RelayBound", "relay bound on udp :40000")
			waitDescribed(t, admin, pod, fmt.Sprintf("RelayBound with count %d", n), func(evs []corev1.Event) bool {
				return len(evs) == 2 && reasonCount(evs, "RelayBound") == n
			})
		}
		r.Warning("RelayLost", "relay socket closed")
		waitDescribed(t, admin, pod, "3 Events", func(evs []corev1.Event) bool { return len(evs) == 3 })

		// What `kubectl describe pod` lists: its field selector names the
		// pod's kind, name, namespace and UID.
		events := describeEvents(t, admin, pod)
		if len(events) != 3 {
			t.Fatalf("%d Events for the pod, want 3: %v", len(events), events)
		}
		want := map[string]struct {
			eventType string
			count     int32
		}{
			"StateLoaded": {corev1.EventTypeNormal, 1},
			"RelayBound":  {corev1.EventTypeNormal, 3},
			"RelayLost":   {corev1.EventTypeWarning, 1},
		}
		for _, ev := range events {
			w, ok := want[ev.Reason]
			if !ok {
				t.Errorf("unexpected Event %s %s", ev.Reason, ev.Message)
				continue
			}
			delete(want, ev.Reason)
			if ev.Type != w.eventType || ev.Count != w.count {
				t.Errorf("%s: type %s, count %d; want %s, %d", ev.Reason, ev.Type, ev.Count, w.eventType, w.count)
			}
			io := ev.InvolvedObject
			if io.APIVersion != "v1" || io.Kind != "Pod" || io.Name != pod.Name || io.Namespace != pod.Namespace || string(io.UID) != pod.UID {
				t.Errorf("%s: involvedObject %+v, want pod %+v", ev.Reason, io, pod)
			}
			if ev.Source.Component != "tsrelay" || ev.ReportingController != "tsrelay" || ev.ReportingInstance != pod.Name {
				t.Errorf("%s: source %+v, reporting %s/%s; want tsrelay, tsrelay/%s",
					ev.Reason, ev.Source, ev.ReportingController, ev.ReportingInstance, pod.Name)
			}
			if !strings.HasPrefix(ev.Name, pod.Name+".") {
				t.Errorf("%s: name %s, want %s.<hex nanos>", ev.Reason, ev.Name, pod.Name)
			}
			if ev.LastTimestamp.Before(&ev.FirstTimestamp) {
				t.Errorf("%s: lastTimestamp %v before firstTimestamp %v", ev.Reason, ev.LastTimestamp, ev.FirstTimestamp)
			}
		}

		// An expired Event (here deleted) is created anew on the next
		// repeat: the patch finds nothing.
		var bound string
		for _, ev := range events {
			if ev.Reason == "RelayBound" {
				bound = ev.Name
			}
		}
		if err := admin.CoreV1().Events(pod.Namespace).Delete(t.Context(), bound, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		r.Normal("RelayBound", "relay bound on udp :40000")
		waitDescribed(t, admin, pod, "a new RelayBound Event", func(evs []corev1.Event) bool {
			return len(evs) == 3 && reasonCount(evs, "RelayBound") > 0
		})
		for _, ev := range describeEvents(t, admin, pod) {
			if ev.Reason == "RelayBound" && (ev.Name == bound || ev.Count != 1) {
				t.Errorf("RelayBound after expiry: %s count %d, want a new Event with count 1", ev.Name, ev.Count)
			}
		}
	})

	t.Run("ForbiddenWithoutRole", func(t *testing.T) {
		r, pod, log := recorderFor(t) // a ServiceAccount with no Role
		r.Normal("StateLoaded", "state loaded")
		r.Warning("NeedsLogin", "log in at https://login.example/a1b2")
		waitFor(t, "2 failures logged", func() bool { return log.count("kube event not posted") == 2 })
		if got := log.count(`level=WARN msg="kube event not posted`); got != 1 {
			t.Errorf("%d failure warnings, want 1 per streak", got)
		}
		if !strings.Contains(log.String(), `the Role needs \"create\" and \"patch\" on events`) {
			t.Errorf("failure warning does not name the verbs:\n%s", log.String())
		}
		if events := describeEvents(t, admin, pod); len(events) != 0 {
			t.Errorf("%d Events without a Role, want 0", len(events))
		}
	})
}

// describeEvents lists the Events `kubectl describe pod` shows for pod.
func describeEvents(t *testing.T, admin kubernetes.Interface, pod Pod) []corev1.Event {
	t.Helper()
	selector := fmt.Sprintf("involvedObject.kind=Pod,involvedObject.name=%s,involvedObject.namespace=%s,involvedObject.uid=%s",
		pod.Name, pod.Namespace, pod.UID)
	list, err := admin.CoreV1().Events(pod.Namespace).List(t.Context(), metav1.ListOptions{FieldSelector: selector})
	if err != nil {
		t.Fatalf("list events as admin: %v", err)
	}
	return list.Items
}

// waitDescribed waits until the Events `kubectl describe pod` shows for pod
// satisfy cond.
func waitDescribed(t *testing.T, admin kubernetes.Interface, pod Pod, what string, cond func([]corev1.Event) bool) {
	t.Helper()
	waitFor(t, what, func() bool { return cond(describeEvents(t, admin, pod)) })
}

// reasonCount returns the count of the Event with reason in evs, or 0.
func reasonCount(evs []corev1.Event, reason string) int32 {
	for _, ev := range evs {
		if ev.Reason == reason {
			return ev.Count
		}
	}
	return 0
}
