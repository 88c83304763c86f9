package manifests_test

import (
	"fmt"
	"testing"

	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// namespaceExample installs the relay into a namespace of its own.
const namespaceExample = "../examples/namespace"

// TestAnotherNamespaceAgainstAPIServer applies examples/namespace to a real
// kube-apiserver and asks its authorizer (SubjectAccessReview) what the
// relay's ServiceAccount in that namespace may do: every call the relay
// makes, there; and nothing in kube-public, where the base installs it.
// Nor may a ServiceAccount tsrelay in kube-public touch the moved relay's
// Secret, which is what an overlay with only a `namespace:` field grants.
func TestAnotherNamespaceAgainstAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	const ns = "tsrelay"
	objs := kubetest.KustomizeObjectsForTest(t, "..", namespaceExample)
	for _, o := range objs {
		if o.GetKind() != "Namespace" && o.GetNamespace() != ns {
			t.Errorf("%s %s is in namespace %q, want %q", o.GetKind(), o.GetName(), o.GetNamespace(), ns)
		}
	}
	srv := kubetest.StartForTest(t)
	ctx := t.Context()
	if err := kubetest.Apply(ctx, srv.Admin, objs, metav1.ApplyOptions{FieldManager: "kubectl"}); err != nil {
		t.Fatalf("apply %s: %v", namespaceExample, err)
	}
	// The pod passes PodSecurity at the level the example's namespace
	// enforces.
	admin := srv.AdminClientForTest(t)
	pod := podFromDeployment(t, objs)
	pod.Namespace = ns
	if _, err := admin.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
		t.Errorf("pod not admitted in namespace %s: %v", ns, err)
	}

	moved := "system:serviceaccount:" + ns + ":tsrelay"
	calls := []authzv1.ResourceAttributes{
		{Verb: "get", Resource: "secrets", Name: "tsrelay-state"},
		{Verb: "update", Resource: "secrets", Name: "tsrelay-state"},
		{Verb: "watch", Resource: "secrets", Name: "tsrelay-state"},
		{Verb: "create", Resource: "secrets"},
		{Verb: "get", Group: "coordination.k8s.io", Resource: "leases", Name: "tsrelay-state"},
		{Verb: "update", Group: "coordination.k8s.io", Resource: "leases", Name: "tsrelay-state"},
		{Verb: "create", Group: "coordination.k8s.io", Resource: "leases"},
		{Verb: "watch", Resource: "services", Name: "tsrelay"},
		{Verb: "create", Resource: "events"},
		{Verb: "patch", Resource: "events", Name: "some-event"},
	}
	srv.WaitAllowedForTest(t, ns, "tsrelay", authzv1.ResourceAttributes{Namespace: ns, Verb: "get", Resource: "secrets", Name: "tsrelay-state"})
	for _, ra := range calls {
		name := fmt.Sprintf("%s/%s/%s/%s", ra.Verb, ra.Group, ra.Resource, ra.Name)
		t.Run(name, func(t *testing.T) {
			in := ra
			in.Namespace = ns
			if !allowedAs(t, srv, moved, ns, &in) {
				t.Errorf("%s may not %s in %s: the relay's calls fail there", moved, name, ns)
			}
			in.Namespace = "kube-public"
			if allowedAs(t, srv, moved, ns, &in) {
				t.Errorf("%s may %s in kube-public", moved, name)
			}
			in.Namespace = ns
			if allowedAs(t, srv, serviceAccount, "kube-public", &in) {
				t.Errorf("%s may %s in %s, on the moved relay's objects", serviceAccount, name, ns)
			}
		})
	}
}

// allowedAs asks the API server's authorizer, through a SubjectAccessReview,
// whether ServiceAccount user of namespace ns may do ra.
func allowedAs(t *testing.T, srv *kubetest.Server, user, ns string, ra *authzv1.ResourceAttributes) bool {
	t.Helper()
	sar := &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
		User:               user,
		Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
		ResourceAttributes: ra,
	}}
	res, err := srv.AdminClientForTest(t).AuthorizationV1().SubjectAccessReviews().Create(t.Context(), sar, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SubjectAccessReview: %v", err)
	}
	return res.Status.Allowed
}
