package lbaddr

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// TestAgainstAPIServer follows a Service on a real kube-apiserver, acting as
// a ServiceAccount that may only get, list and watch that one Service (by
// resourceNames), as the relay's Role allows. Each subtest has its own
// namespace on one shared control plane.
func TestAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)

	clientFor := srv.DynamicClientForTest
	// The Role the relay needs (see the package comment).
	relayRule := rbacv1.PolicyRule{
		APIGroups: []string{""}, Resources: []string{"services"}, ResourceNames: []string{"tsrelay"},
		Verbs: []string{"get", "list", "watch"},
	}

	t.Run("FollowsStatus", func(t *testing.T) {
		ns := srv.NamespaceForTest(t, nil)
		rec := startWatch(t, Config{
			Client: clientFor(t, ns, "relay", relayRule), Namespace: ns, Name: "tsrelay", RelayPort: testRelayPort,
		})
		ref := ns + "/tsrelay"
		rec.waitWhy(t, fmt.Sprintf("Service %s not found", ref))

		services := admin.CoreV1().Services(ns)
		// maxDelay is the longest time from an API call returning to
		// OnChange reporting its effect.
		var maxDelay time.Duration
		var maxStep string
		step := func(name string, change func(ctx context.Context) error, wait func() report) {
			t.Helper()
			if err := change(t.Context()); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			changed := time.Now()
			got := wait()
			delay := max(got.at.Sub(changed), 0) // the event may beat the API call's response
			t.Logf("%-26s %6.1f ms  %v", name, float64(delay)/float64(time.Millisecond), got)
			if delay > maxDelay {
				maxDelay, maxStep = delay, name
			}
		}
		setIngress := func(ingress string) func(context.Context) error {
			return func(ctx context.Context) error {
				patch := fmt.Sprintf(`{"status":{"loadBalancer":{"ingress":%s}}}`, ingress)
				_, err := services.Patch(ctx, "tsrelay", types.MergePatchType, []byte(patch), metav1.PatchOptions{}, "status")
				return err
			}
		}

		step("create Service", func(ctx context.Context) error {
			_, err := services.Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: "tsrelay"},
				Spec: corev1.ServiceSpec{
					Type: corev1.ServiceTypeLoadBalancer,
					Ports: []corev1.ServicePort{{
						Name: "relay", Protocol: corev1.ProtocolUDP, Port: 41000, TargetPort: intstr.FromInt32(testRelayPort),
					}},
					Selector: map[string]string{"app": "tsrelay"},
				},
			}, metav1.CreateOptions{})
			return err
		}, func() report { return rec.waitWhy(t, fmt.Sprintf("Service %s has no load-balancer address yet", ref)) })
		step("IPv4", setIngress(`[{"ip":"192.0.2.10"}]`), func() report {
			return rec.waitFound(t, ep("192.0.2.10:41000", SourceService))
		})
		step("IPv6", setIngress(`[{"ip":"2001:db8::10"}]`), func() report {
			return rec.waitFound(t, ep("[2001:db8::10]:41000", SourceService))
		})
		step("IPv4 and IPv6", setIngress(`[{"ip":"2001:db8::10"},{"ip":"192.0.2.10"}]`), func() report {
			return rec.waitFound(t, ep("192.0.2.10:41000", SourceService), ep("[2001:db8::10]:41000", SourceService))
		})
		step("hostname localhost", setIngress(`[{"hostname":"localhost"}]`), func() report {
			// /etc/hosts gives 127.0.0.1 and perhaps ::1.
			return rec.waitReport(t, "localhost's addresses", func(got report) bool {
				var has127 bool
				for _, e := range got.found {
					if e.Source != SourceDNS || !e.AddrPort.Addr().IsLoopback() || e.AddrPort.Port() != 41000 {
						return false
					}
					has127 = has127 || e.AddrPort == netip.MustParseAddrPort("127.0.0.1:41000")
				}
				return has127
			})
		})
		step("change of IP", setIngress(`[{"ip":"192.0.2.20"}]`), func() report {
			return rec.waitFound(t, ep("192.0.2.20:41000", SourceService))
		})
		step("removal", setIngress(`null`), func() report {
			return rec.waitWhy(t, fmt.Sprintf("Service %s has no load-balancer address yet", ref))
		})
		step("delete Service", func(ctx context.Context) error {
			return services.Delete(ctx, "tsrelay", metav1.DeleteOptions{})
		}, func() report { return rec.waitWhy(t, fmt.Sprintf("Service %s not found", ref)) })

		t.Logf("max delay from API change to OnChange: %v (%s); the issue demands at most 2s", maxDelay, maxStep)
		if maxDelay >= 2*time.Second {
			t.Logf("NOTE: max delay %v is over the 2s the issue demands", maxDelay)
		}
		// With the Role as the relay has it, no read may fail: a
		// forbidden list or watch would be retried with a warning.
		if log := rec.log.String(); strings.Contains(log, "level=WARN") {
			t.Errorf("warnings logged:\n%s", log)
		}
	})

	t.Run("WatchForbidden", func(t *testing.T) {
		ns := srv.NamespaceForTest(t, nil)
		getOnly := relayRule
		getOnly.Verbs = []string{"get"}
		rec := startWatch(t, Config{
			Client: clientFor(t, ns, "relay", getOnly), Namespace: ns, Name: "tsrelay", RelayPort: testRelayPort,
		})
		want := `msg="forbidden to read the Service; retrying"`
		waitFor(t, &rec.log.broadcaster, "a warning that listing is forbidden", func() bool {
			return strings.Contains(rec.log.String(), want)
		})
		log := rec.log.String()
		if !strings.Contains(log, `the Role needs \"get\", \"list\" and \"watch\" on the Service tsrelay (resourceNames)`) {
			t.Errorf("the warning does not say what the Role needs:\n%s", log)
		}
		if got := rec.all(); len(got) != 0 {
			t.Errorf("OnChange called before the Service could be read: %v", got)
		}
	})

	t.Run("WatchForbiddenListAllowed", func(t *testing.T) {
		ns := srv.NamespaceForTest(t, nil)
		noWatch := relayRule
		noWatch.Verbs = []string{"get", "list"}
		rec := startWatch(t, Config{
			Client: clientFor(t, ns, "relay", noWatch), Namespace: ns, Name: "tsrelay", RelayPort: testRelayPort,
		})
		// The list works, so the Service's state is known.
		rec.waitWhy(t, fmt.Sprintf("Service %s/tsrelay not found", ns))
		waitFor(t, &rec.log.broadcaster, "two retries", func() bool {
			return strings.Count(rec.log.String(), "reading the Service still fails") >= 2
		})
		log := rec.log.String()
		if n := strings.Count(log, "level=WARN"); n != 1 || !strings.Contains(log, "forbidden to read the Service") {
			t.Errorf("logged %d warnings, want 1 saying watch is forbidden:\n%s", n, log)
		}
		if strings.Contains(log, "works again") {
			t.Errorf("a list that works ended the failure streak of a forbidden watch:\n%s", log)
		}
	})

	t.Run("CheckForbidden", func(t *testing.T) {
		ns := srv.NamespaceForTest(t, nil)
		err := Check(t.Context(), Config{Client: clientFor(t, ns, "nobody"), Namespace: ns, Name: "tsrelay"})
		want := fmt.Sprintf(`forbidden to "get" services in %s; the Role needs "get", "list" and "watch" on the Service tsrelay (resourceNames)`, ns)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Check without permission = %v, want an error containing %q", err, want)
		}
	})

	t.Run("CheckMissingService", func(t *testing.T) {
		ns := srv.NamespaceForTest(t, nil)
		err := Check(t.Context(), Config{Client: clientFor(t, ns, "relay", relayRule), Namespace: ns, Name: "tsrelay"})
		if err != nil {
			t.Errorf("Check of a missing Service = %v, want nil", err)
		}
	})
}
