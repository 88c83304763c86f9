package kubetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/internal/testenv"
)

// apiTimeout bounds the helpers' own API calls.
const apiTimeout = 30 * time.Second

// StartForTest is Start for tests, in t.TempDir(). When the binaries are
// missing it fails the test if $TSRELAY_KUBE_ASSETS is set (it names them,
// as make test does) or skips are not allowed (see testenv), and otherwise
// skips it, saying how to get them. It fails the test when the control plane
// does not start (a broken binary, say), and stops it in t.Cleanup, logging
// the tail of the API server's log if the test failed.
func StartForTest(t testing.TB) *Server {
	t.Helper()
	assets, err := Assets()
	if err != nil {
		if dir := os.Getenv(AssetsEnv); dir != "" {
			t.Fatalf("no real Kubernetes API server, though %s=%s: %v", AssetsEnv, dir, err)
		}
		testenv.SkipUnlessAllowed(t, "no real Kubernetes API server: %v", err)
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

// DynamicClientForTest returns a dynamic client that acts as
// ServiceAccount sa in namespace ns (created if need be), granted rules
// first if there are any (GrantForTest).
func (s *Server) DynamicClientForTest(t testing.TB, ns, sa string, rules ...rbacv1.PolicyRule) dynamic.Interface {
	t.Helper()
	token := s.ServiceAccountTokenForTest(t, ns, sa)
	if len(rules) > 0 {
		s.GrantForTest(t, ns, sa, rules...)
	}
	dc, err := dynamic.NewForConfig(s.Config(token))
	if err != nil {
		t.Fatal(err)
	}
	return dc
}

// KubeconfigForTest writes a kubeconfig that acts as ServiceAccount sa in
// namespace ns (created if need be) with a TokenRequest token, into a
// directory under t.TempDir(), and returns its path: what the relay gets
// outside a pod, or through KUBECONFIG in the end-to-end tests.
func (s *Server) KubeconfigForTest(t testing.TB, ns, sa string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := s.WriteKubeconfig(path, s.ServiceAccountTokenForTest(t, ns, sa), ns); err != nil {
		t.Fatal(err)
	}
	return path
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
	var ras []authzv1.ResourceAttributes
	for _, r := range rules {
		ra := authzv1.ResourceAttributes{Namespace: ns, Verb: r.Verbs[0], Group: r.APIGroups[0], Resource: r.Resources[0]}
		if len(r.ResourceNames) > 0 {
			ra.Name = r.ResourceNames[0]
		}
		ras = append(ras, ra)
	}
	s.WaitAllowedForTest(t, ns, sa, ras...)
}

// WaitAllowedForTest waits until ServiceAccount sa in namespace ns may do
// each of ras. The authorizer learns of new Roles and bindings through a
// watch, a moment after they are created: on a busy machine a request made
// right away can be refused.
func (s *Server) WaitAllowedForTest(t testing.TB, ns, sa string, ras ...authzv1.ResourceAttributes) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), apiTimeout)
	defer cancel()
	cs := s.AdminClientForTest(t)
	user := "system:serviceaccount:" + ns + ":" + sa
	groups := []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}
	for _, ra := range ras {
		err := tailnettest.WaitFor(ctx, 20*time.Millisecond, func() (bool, error) {
			res, err := cs.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{
				Spec: authzv1.SubjectAccessReviewSpec{User: user, Groups: groups, ResourceAttributes: &ra},
			}, metav1.CreateOptions{})
			return err == nil && res.Status.Allowed, err
		})
		if err != nil {
			t.Fatalf("%s is still not allowed to %+v: %v", user, ra, err)
		}
	}
}
