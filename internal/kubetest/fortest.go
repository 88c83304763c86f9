package kubetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// apiTimeout bounds the helpers' own API calls.
const apiTimeout = 30 * time.Second

// StartForTest is Start for tests, in t.TempDir(). It skips the test, saying
// how to get the binaries, when they are missing; fails it when the control
// plane does not start; and stops it in t.Cleanup, logging the tail of the
// API server's log if the test failed.
func StartForTest(t testing.TB) *Server {
	t.Helper()
	assets, err := Assets()
	if err != nil {
		t.Skipf("no real Kubernetes API server: %v", err)
	}
	s, err := Start(t.Context(), assets, t.TempDir())
	if err != nil {
		t.Fatalf("start kube-apiserver: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kube-apiserver log tail:\n%s", s.LogTail(40))
		}
		s.Close()
	})
	return s
}

// AdminClientForTest returns a typed client acting as a cluster admin.
func (s *Server) AdminClientForTest(t testing.TB) kubernetes.Interface {
	t.Helper()
	cs, err := kubernetes.NewForConfig(s.Admin)
	if err != nil {
		t.Fatalf("admin client: %v", err)
	}
	return cs
}

// NamespaceForTest creates a namespace with a random name and labels, and
// returns its name. Tests sharing one Server use one namespace each.
func (s *Server) NamespaceForTest(t testing.TB, labels map[string]string) string {
	t.Helper()
	suffix := make([]byte, 4)
	rand.Read(suffix)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "test-" + hex.EncodeToString(suffix), Labels: labels}}
	ctx, cancel := context.WithTimeout(t.Context(), apiTimeout)
	defer cancel()
	if _, err := s.AdminClientForTest(t).CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	return ns.Name
}

// ServiceAccountTokenForTest creates ServiceAccount name in namespace ns if
// it does not exist, and returns a token for it from the TokenRequest API,
// as the kubelet would mount into a pod.
func (s *Server) ServiceAccountTokenForTest(t testing.TB, ns, name string) string {
	t.Helper()
	tok, err := s.serviceAccountToken(t.Context(), s.AdminClientForTest(t), ns, name)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func (s *Server) serviceAccountToken(ctx context.Context, cs kubernetes.Interface, ns, name string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
	if _, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("create service account %s/%s: %w", ns, name, err)
	}
	expiry := int64(time.Hour / time.Second)
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name,
		&authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{ExpirationSeconds: &expiry}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for service account %s/%s: %w", ns, name, err)
	}
	return tr.Status.Token, nil
}

// GrantForTest creates a Role with rules in namespace ns and binds it to
// ServiceAccount sa.
func (s *Server) GrantForTest(t testing.TB, ns, sa string, rules ...rbacv1.PolicyRule) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), apiTimeout)
	defer cancel()
	cs := s.AdminClientForTest(t)
	name := sa + "-test"
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Rules: rules}
	if _, err := cs.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create role: %v", err)
	}
	rb := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: ns}},
	}
	if _, err := cs.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create role binding: %v", err)
	}
}
