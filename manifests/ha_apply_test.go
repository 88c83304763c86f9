package manifests_test

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// TestHAAgainstAPIServer applies examples/ha and examples/ha-derp, each to a
// real kube-apiserver of its own, and checks what only a real server can:
// every object is valid and applies with server-side apply; the replicas'
// pods pass PodSecurity admission at the restricted level; each per-relay
// Service selects exactly its pod; and the ServiceAccount may make the
// calls the replicas make and nothing more.
//
// kubetest runs no controller-manager, so no StatefulSet controller: the
// test creates the pods tsrelay-0 and tsrelay-1 itself, as that controller
// would (the template, the pod's name, the pod-name and pod-index labels,
// hostname and subdomain).
func TestHAAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	for _, tc := range []struct {
		dir  string
		derp bool
	}{
		{haExample, false},
		{haDERPExample, true},
	} {
		t.Run(filepath.Base(tc.dir), func(t *testing.T) {
			objs := kubetest.KustomizeObjectsForTest(t, "..", tc.dir)
			srv := kubetest.StartForTest(t)
			admin := srv.AdminClientForTest(t)
			ctx := t.Context()

			enforceRestricted(t, admin)

			for range 2 { // applying again changes nothing and must not fail
				if err := kubetest.Apply(ctx, srv.Admin, objs, metav1.ApplyOptions{FieldManager: "kubectl"}); err != nil {
					t.Fatalf("apply %s: %v", tc.dir, err)
				}
			}
			for _, o := range objs {
				if o.GetNamespace() != namespace {
					t.Errorf("%s %s is in namespace %q, want %q", o.GetKind(), o.GetName(), o.GetNamespace(), namespace)
				}
			}

			t.Run("PodSecurityRestricted", func(t *testing.T) {
				sts, err := admin.AppsV1().StatefulSets(namespace).Get(ctx, "tsrelay", metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				pods := podsFromStatefulSet(t, objs)
				for _, pod := range pods {
					if _, err := admin.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
						t.Fatalf("pod %s is not admitted at PodSecurity level restricted: %v", pod.Name, err)
					}
				}
				if len(pods) != int(*sts.Spec.Replicas) {
					t.Fatalf("%d pods for %d replicas", len(pods), *sts.Spec.Replicas)
				}
				// The same check rejects a pod that is only slightly
				// weaker, so the admissions above mean something.
				weak := pods[0].DeepCopy()
				weak.Name = "tsrelay-weak"
				weak.Spec.Containers[0].SecurityContext.Capabilities = nil
				_, err = admin.CoreV1().Pods(namespace).Create(ctx, weak, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
				if err == nil || !strings.Contains(err.Error(), "violates PodSecurity") {
					t.Fatalf("a pod that keeps its capabilities was not rejected by PodSecurity: %v", err)
				}

				// Each per-relay Service, as stored, selects its own pod and
				// no other; the headless Service and the PDB select all.
				for i := range pods {
					name := "tsrelay-" + strconv.Itoa(i)
					svc, err := admin.CoreV1().Services(namespace).Get(ctx, name, metav1.GetOptions{})
					if err != nil {
						t.Fatal(err)
					}
					if got := selectedPods(t, srv, svc.Spec.Selector); len(got) != 1 || got[0] != name {
						t.Errorf("Service %s selects pods %v, want [%s]", name, got, name)
					}
					if svc.Spec.Type != corev1.ServiceTypeLoadBalancer {
						t.Errorf("stored Service %s has type %s, want LoadBalancer", name, svc.Spec.Type)
					}
				}
				hl, err := admin.CoreV1().Services(namespace).Get(ctx, sts.Spec.ServiceName, metav1.GetOptions{})
				if err != nil {
					t.Fatalf("the StatefulSet's serviceName: %v", err)
				}
				if got := selectedPods(t, srv, hl.Spec.Selector); len(got) != len(pods) {
					t.Errorf("headless Service %s selects %v, want every replica", hl.Name, got)
				}
				pdb, err := admin.PolicyV1().PodDisruptionBudgets(namespace).Get(ctx, "tsrelay", metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if got := selectedPods(t, srv, pdb.Spec.Selector.MatchLabels); len(got) != len(pods) {
					t.Errorf("PodDisruptionBudget selects %v, want every replica", got)
				}
			})

			t.Run("RBAC", func(t *testing.T) {
				// The replicas share the ServiceAccount, and so one Role:
				// each may reach every replica's state, none anything else.
				srv.WaitAllowedForTest(t, namespace, "tsrelay", authzv1.ResourceAttributes{Namespace: namespace, Verb: "get", Resource: "secrets", Name: "tsrelay-0-state"})
				type check struct {
					verb, group, resource, name string
					allowed                     bool
				}
				var checks []check
				for _, r := range []string{"tsrelay-0", "tsrelay-1"} {
					checks = append(checks,
						check{"get", "", "secrets", r + "-state", true},
						check{"update", "", "secrets", r + "-state", true},
						check{"get", "coordination.k8s.io", "leases", r + "-state", true},
						check{"update", "coordination.k8s.io", "leases", r + "-state", true},
						check{"get", "", "services", r, true},
						check{"list", "", "services", r, true},
						check{"watch", "", "services", r, true},
						check{"patch", "", "secrets", r + "-state", false},
						check{"delete", "", "secrets", r + "-state", false},
						check{"delete", "coordination.k8s.io", "leases", r + "-state", false},
						check{"update", "", "services", r, false},
						check{"update", "", "services/status", r, false},
					)
				}
				checks = append(checks,
					check{"create", "", "secrets", "", true},
					check{"create", "coordination.k8s.io", "leases", "", true},
					check{"create", "", "events", "", true},
					check{"patch", "", "events", "some-event", true},
					check{"create", "events.k8s.io", "events", "", true},
					// The mesh Secret, with ha-derp only.
					check{"get", "", "secrets", meshSecret, tc.derp},
					check{"update", "", "secrets", meshSecret, tc.derp},
					check{"delete", "", "secrets", meshSecret, false},
					// Not the single relay's state, nor a replica that does
					// not exist, nor any other Secret, Lease or Service.
					check{"get", "", "secrets", stateSecret, false},
					check{"update", "", "secrets", stateSecret, false},
					check{"get", "coordination.k8s.io", "leases", stateSecret, false},
					check{"get", "", "secrets", "tsrelay-2-state", false},
					check{"get", "", "secrets", "tsrelay-auth", false},
					check{"get", "", "secrets", "other", false},
					check{"list", "", "secrets", "", false},
					check{"watch", "", "secrets", "", false},
					check{"get", "coordination.k8s.io", "leases", "other", false},
					check{"list", "coordination.k8s.io", "leases", "", false},
					check{"get", "", "services", "tsrelay", false},
					check{"watch", "", "services", "tsrelay", false},
					check{"get", "", "services", "tsrelay-headless", false},
					check{"watch", "", "services", "tsrelay-2", false},
					check{"watch", "", "services", "other", false},
					check{"list", "", "services", "", false},
					check{"get", "", "pods", "tsrelay-0", false},
					check{"create", "", "pods/exec", "", false},
					check{"get", "", "configmaps", "tsrelay-config", false},
					check{"update", "apps", "statefulsets", "tsrelay", false},
				)
				for _, tc := range checks {
					name := fmt.Sprintf("%s/%s/%s/%s", tc.verb, tc.group, tc.resource, tc.name)
					t.Run(name, func(t *testing.T) {
						resource, sub, _ := strings.Cut(tc.resource, "/")
						got := allowed(t, srv, &authzv1.ResourceAttributes{
							Namespace: namespace, Verb: tc.verb, Group: tc.group,
							Resource: resource, Subresource: sub, Name: tc.name,
						})
						if got != tc.allowed {
							t.Errorf("%s %s allowed = %v, want %v", serviceAccount, name, got, tc.allowed)
						}
					})
				}
				for _, ra := range []authzv1.ResourceAttributes{
					{Namespace: "default", Verb: "get", Resource: "secrets", Name: "tsrelay-0-state"},
					{Verb: "list", Resource: "nodes"},
					{Verb: "create", Group: "rbac.authorization.k8s.io", Resource: "clusterrolebindings"},
				} {
					if allowed(t, srv, &ra) {
						t.Errorf("%s may %s %s in %q", serviceAccount, ra.Verb, ra.Resource, ra.Namespace)
					}
				}
			})
		})
	}
}

// podsFromStatefulSet returns the pods the StatefulSet controller would
// create for the rendered StatefulSet tsrelay: the template with the
// identity updateIdentity and initIdentity give each (the name set-N, the
// pod-name and pod-index labels, hostname and subdomain; the controller's
// revision label and owner reference are left out: admission does not look
// at them).
func podsFromStatefulSet(t *testing.T, objs []*unstructured.Unstructured) []*corev1.Pod {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() != "StatefulSet" {
			continue
		}
		var sts appsv1.StatefulSet
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, &sts, true); err != nil {
			t.Fatalf("StatefulSet %s: %v", o.GetName(), err)
		}
		var pods []*corev1.Pod
		for i := range int(*sts.Spec.Replicas) {
			name := sts.Name + "-" + strconv.Itoa(i)
			pt := sts.Spec.Template.DeepCopy()
			l := map[string]string{appsv1.StatefulSetPodNameLabel: name, appsv1.PodIndexLabel: strconv.Itoa(i)}
			for k, v := range pt.Labels {
				l[k] = v
			}
			pt.Spec.Hostname, pt.Spec.Subdomain = name, sts.Spec.ServiceName
			pods = append(pods, &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: l, Annotations: pt.Annotations},
				Spec:       pt.Spec,
			})
		}
		return pods
	}
	t.Fatal("no StatefulSet")
	return nil
}

// selectedPods lists, through the API server's own label selection, the
// names of the pods in the namespace that selector selects.
func selectedPods(t *testing.T, srv *kubetest.Server, selector map[string]string) []string {
	t.Helper()
	if len(selector) == 0 {
		t.Fatal("empty selector: it would select every pod")
	}
	list, err := srv.AdminClientForTest(t).CoreV1().Pods(namespace).List(t.Context(),
		metav1.ListOptions{LabelSelector: labels.SelectorFromSet(selector).String()})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range list.Items {
		names = append(names, p.Name)
	}
	return names
}
