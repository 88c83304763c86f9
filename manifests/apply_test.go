package manifests_test

import (
	"fmt"
	"strings"
	"testing"

	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

const (
	namespace      = "kube-public"
	serviceAccount = "system:serviceaccount:kube-public:tsrelay"
)

// TestAgainstAPIServer applies install.yaml to a real kube-apiserver and
// checks what only a real server can: every object is valid and applies
// with server-side apply; the relay's pod passes PodSecurity admission at the
// restricted level; and the ServiceAccount may make every call the relay
// makes and nothing more.
func TestAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	ctx := t.Context()

	objs, err := kubetest.ReadManifests("install.yaml")
	if err != nil {
		t.Fatal(err)
	}
	enforceRestricted(t, admin)

	t.Run("ServerSideApply", func(t *testing.T) {
		for range 2 { // applying again changes nothing and must not fail
			if err := kubetest.Apply(ctx, srv.Admin, objs, metav1.ApplyOptions{FieldManager: "kubectl"}); err != nil {
				t.Fatal(err)
			}
		}
		for _, o := range objs {
			if o.GetNamespace() != namespace {
				t.Errorf("%s %s is in namespace %q, want %q", o.GetKind(), o.GetName(), o.GetNamespace(), namespace)
			}
		}
	})

	t.Run("PodSecurityRestricted", func(t *testing.T) {
		pod := podFromDeployment(t, objs)
		if _, err := admin.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
			t.Fatalf("the relay's pod is not admitted at PodSecurity level restricted: %v", err)
		}
		// The same check rejects a pod that is only slightly weaker, so
		// the admission above means something.
		weak := pod.DeepCopy()
		weak.Spec.Containers[0].SecurityContext.Capabilities = nil
		_, err := admin.CoreV1().Pods(namespace).Create(ctx, weak, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err == nil || !strings.Contains(err.Error(), "violates PodSecurity") {
			t.Fatalf("a pod that keeps its capabilities was not rejected by PodSecurity: %v", err)
		}
	})

	t.Run("RBAC", func(t *testing.T) {
		// Wait for the authorizer to see the new RoleBinding.
		srv.WaitAllowedForTest(t, namespace, "tsrelay", authzv1.ResourceAttributes{Namespace: namespace, Verb: "get", Resource: "secrets", Name: "tsrelay-state"})
		for _, tc := range []struct {
			verb, group, resource, name string
			allowed                     bool
		}{
			// What the relay does: its state Secret, the Secret's first
			// creation, the Lease on its identity (same name) and its
			// creation, its own Service (for its address), Events.
			{"get", "", "secrets", "tsrelay-state", true},
			{"update", "", "secrets", "tsrelay-state", true},
			{"watch", "", "secrets", "tsrelay-state", true},
			{"watch", "", "secrets", "tsrelay-auth", false},
			{"create", "", "secrets", "", true},
			{"get", "coordination.k8s.io", "leases", "tsrelay-state", true},
			{"update", "coordination.k8s.io", "leases", "tsrelay-state", true},
			{"create", "coordination.k8s.io", "leases", "", true},
			{"get", "", "services", "tsrelay", true},
			{"list", "", "services", "tsrelay", true},
			{"watch", "", "services", "tsrelay", true},
			{"create", "", "events", "", true},
			{"patch", "", "events", "some-event", true},
			{"create", "events.k8s.io", "events", "", true},
			{"patch", "events.k8s.io", "events", "some-event", true},
			// Nothing else: no other Secret (the auth key included) or
			// Lease, no listing, no deleting, no other Service, nothing in
			// pods.
			{"get", "", "secrets", "tsrelay-auth", false},
			{"get", "", "secrets", "other", false},
			{"list", "", "secrets", "", false},
			{"watch", "", "secrets", "", false},
			{"patch", "", "secrets", "tsrelay-state", false},
			{"delete", "", "secrets", "tsrelay-state", false},
			{"update", "", "secrets", "other", false},
			{"get", "coordination.k8s.io", "leases", "other", false},
			{"update", "coordination.k8s.io", "leases", "other", false},
			{"list", "coordination.k8s.io", "leases", "", false},
			{"watch", "coordination.k8s.io", "leases", "", false},
			{"delete", "coordination.k8s.io", "leases", "tsrelay-state", false},
			{"patch", "coordination.k8s.io", "leases", "tsrelay-state", false},
			{"get", "", "services", "other", false},
			{"list", "", "services", "", false},
			{"update", "", "services", "tsrelay", false},
			{"update", "", "services/status", "tsrelay", false},
			{"create", "", "pods/exec", "", false},
			{"get", "", "configmaps", "tsrelay-config", false},
		} {
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
		// Nothing outside its namespace.
		for _, ra := range []authzv1.ResourceAttributes{
			{Namespace: "default", Verb: "get", Resource: "secrets", Name: "tsrelay-state"},
			{Verb: "list", Resource: "nodes"},
			{Verb: "list", Resource: "namespaces"},
			{Verb: "create", Group: "rbac.authorization.k8s.io", Resource: "clusterrolebindings"},
		} {
			if allowed(t, srv, &ra) {
				t.Errorf("%s may %s %s in %q", serviceAccount, ra.Verb, ra.Resource, ra.Namespace)
			}
		}
	})
}

// allowed asks the API server's authorizer, through a SubjectAccessReview,
// whether the relay's ServiceAccount may do ra.
func allowed(t *testing.T, srv *kubetest.Server, ra *authzv1.ResourceAttributes) bool {
	t.Helper()
	sar := &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
		User:               serviceAccount,
		Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + namespace, "system:authenticated"},
		ResourceAttributes: ra,
	}}
	res, err := srv.AdminClientForTest(t).AuthorizationV1().SubjectAccessReviews().Create(t.Context(), sar, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SubjectAccessReview: %v", err)
	}
	return res.Status.Allowed
}

// podFromDeployment returns the pod the Deployment's controller would
// create.
func podFromDeployment(t *testing.T, objs []*unstructured.Unstructured) *corev1.Pod {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() != "Deployment" {
			continue
		}
		tmpl, found, err := unstructured.NestedMap(o.Object, "spec", "template")
		if err != nil || !found {
			t.Fatalf("deployment %s has no pod template: %v", o.GetName(), err)
		}
		var pt corev1.PodTemplateSpec
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(tmpl, &pt, true); err != nil {
			t.Fatalf("deployment %s: pod template: %v", o.GetName(), err)
		}
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{GenerateName: o.GetName() + "-", Namespace: namespace, Labels: pt.Labels, Annotations: pt.Annotations},
			Spec:       pt.Spec,
		}
	}
	t.Fatal("install.yaml has no Deployment")
	return nil
}

// enforceRestricted labels the relay's namespace on the API server admin
// talks to for the restricted Pod Security Standard, as a careful cluster
// does, so that what is applied there must pass it.
func enforceRestricted(t *testing.T, admin kubernetes.Interface) {
	t.Helper()
	ctx := t.Context()
	ns, err := admin.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels["pod-security.kubernetes.io/enforce"] = "restricted"
	if _, err := admin.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}
