package derpregion

import (
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/kubestate"
)

// TestSelfSignedInSecret keeps the certificate in the relay's state Secret
// on a real API server, with only the relay's RBAC: a fresh store (a new
// pod) finds the same certificate, so the pasted derpMap still holds.
func TestSelfSignedInSecret(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	ns := srv.NamespaceForTest(t, nil)
	t.Setenv("KUBECONFIG", srv.KubeconfigForTest(t, ns, "relay"))
	// The Role the manifests grant (manifests/rbac.yaml), for Secret "state".
	srv.GrantForTest(t, ns, "relay",
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{"state"}, Verbs: []string{"get", "update"}},
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
	)
	open := func() *kubestate.Store {
		t.Helper()
		kc, err := kubeclient.New()
		if err != nil {
			t.Fatal(err)
		}
		s, err := kubestate.New(t.Context(), nil, kc.Dynamic, kc.Namespace, "state")
		if err != nil {
			t.Fatalf("open the state Secret: %v", err)
		}
		return s
	}

	first, err := SelfSigned(open(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	again, err := SelfSigned(open(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if again.Created() || again.CertName() != first.CertName() {
		t.Errorf("from a fresh store: CertName %s (created %v), want the stored %s", again.CertName(), again.Created(), first.CertName())
	}
	sec, err := srv.AdminClientForTest(t).CoreV1().Secrets(ns).Get(t.Context(), "state", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(sec.Data) != 1 {
		t.Errorf("state Secret keys = %d, want just the certificate's", len(sec.Data))
	}
	for k := range sec.Data {
		t.Logf("certificate kept under Secret key %q", k)
	}
}
