package derpregion

import (
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/kubestate"
)

// TestSharedInSecret keeps the region's shared state in a Secret on a real
// API server with only the RBAC the install grants: concurrent creators
// agree, and a user's key-only Secret is completed with the key kept.
func TestSharedInSecret(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	ns := srv.NamespaceForTest(t, nil)
	t.Setenv("KUBECONFIG", srv.KubeconfigForTest(t, ns, "relay"))
	srv.GrantForTest(t, ns, "relay",
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{"mesh", "usermesh"}, Verbs: []string{"get", "update"}},
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
	)
	kc, err := kubeclient.New()
	if err != nil {
		t.Fatal(err)
	}
	complete := func(d map[string][]byte) (map[string][]byte, bool, error) { return CompleteShared(d, time.Now()) }

	const n = 4
	got := make([]*Shared, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			data, err := kubestate.EnsureSecret(t.Context(), kc.Dynamic, kc.Namespace, "mesh", complete)
			if err != nil {
				t.Errorf("creator %d: %v", i, err)
				return
			}
			if got[i], err = ParseShared(data, time.Now()); err != nil {
				t.Errorf("creator %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	for i := 1; i < n && got[0] != nil; i++ {
		if got[i] == nil || !got[i].MeshKey.Equal(got[0].MeshKey) || got[i].Cert.CertName() != got[0].Cert.CertName() {
			t.Errorf("creator %d ended with another key or certificate than creator 0", i)
		}
	}

	admin := srv.AdminClientForTest(t)
	userKey := "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	_, err = admin.CoreV1().Secrets(ns).Create(t.Context(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "usermesh"},
		StringData: map[string]string{SharedMeshKey: userKey},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data, err := kubestate.EnsureSecret(t.Context(), kc.Dynamic, kc.Namespace, "usermesh", complete)
	if err != nil {
		t.Fatal(err)
	}
	sh, err := ParseShared(data, time.Now())
	if err != nil || sh.MeshKey.String() != userKey {
		t.Fatalf("completed user Secret: %v; want the user's key kept", err)
	}
	sec, err := admin.CoreV1().Secrets(ns).Get(t.Context(), "usermesh", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if string(sec.Data[SharedMeshKey]) != userKey || len(sec.Data[SharedCertKey]) == 0 || len(sec.Data[SharedCertPriv]) == 0 {
		t.Errorf("user Secret keys after completion: mesh key kept %v, certificate %d bytes, key %d bytes",
			string(sec.Data[SharedMeshKey]) == userKey, len(sec.Data[SharedCertKey]), len(sec.Data[SharedCertPriv]))
	}
}
