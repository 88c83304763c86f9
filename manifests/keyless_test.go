package manifests_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// keylessPlaceholder is the audience components/keyless ships until the
// user patches it; the relay recognises it (keyless/login.go).
const keylessPlaceholder = "tsrelay.invalid/set-the-credential-audience"

// TestKeylessComponent renders components/keyless on the single relay
// (examples/keyless, audience patched) and on components/ha, listed after
// it and before it, and checks that every relay pod gets the projected
// ServiceAccount token of ServiceAccount tsrelay with an audience and an
// expiry, mounted read-only where TS_ID_TOKEN_FILE points, and no
// tsrelay-auth dependence beyond the optional envFrom. Then the real API
// server admits the pods at PodSecurity level restricted.
func TestKeylessComponent(t *testing.T) {
	abs := func(p string) string {
		a, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	haFirst, keylessFirst := t.TempDir(), t.TempDir()
	for dir, components := range map[string][]string{
		haFirst:      {"components/ha", "components/keyless"},
		keylessFirst: {"components/keyless", "components/ha"},
	} {
		// kustomize takes only relative paths to other kustomizations.
		rel := func(p string) string {
			r, err := filepath.Rel(dir, abs(p))
			if err != nil {
				t.Fatal(err)
			}
			return r
		}
		k := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: kube-public\nresources:\n- " + rel(".") +
			"\ncomponents:\n- " + rel(components[0]) + "\n- " + rel(components[1]) + "\n"
		if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name, dir, audience string
	}{
		{"single relay (examples/keyless)", "../examples/keyless", "console.invalid/paste-your-credential-audience"},
		{"ha, then keyless", haFirst, keylessPlaceholder},
		{"keyless, then ha", keylessFirst, keylessPlaceholder},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := kubetest.KustomizeObjectsForTest(t, "..", tc.dir)
			var pods []*corev1.Pod
			if strings.Contains(tc.name, "ha") {
				pods = podsFromStatefulSet(t, objs)
			} else {
				pods = []*corev1.Pod{podFromDeployment(t, objs)}
			}
			for _, pod := range pods {
				checkKeylessPod(t, pod, tc.audience)
			}
			if testing.Short() {
				return
			}
			checkAdmittedRestricted(t, objs, pods)
		})
	}

	// The placeholder the relay recognises is the one the component ships.
	for _, f := range []string{"components/keyless/deployment-patch.yaml", "../keyless/login.go"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), keylessPlaceholder) {
			t.Errorf("%s does not name the audience placeholder %s", f, keylessPlaceholder)
		}
	}
}

// checkKeylessPod checks one relay pod's token volume, mount and setting.
func checkKeylessPod(t *testing.T, pod *corev1.Pod, audience string) {
	t.Helper()
	if pod.Spec.ServiceAccountName != "tsrelay" {
		t.Errorf("pod %s runs as ServiceAccount %q, want tsrelay (the credential's subject)", pod.GenerateName+pod.Name, pod.Spec.ServiceAccountName)
	}
	var token *corev1.ServiceAccountTokenProjection
	var volume string
	for _, v := range pod.Spec.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, s := range v.Projected.Sources {
			if s.ServiceAccountToken != nil {
				token, volume = s.ServiceAccountToken, v.Name
			}
		}
	}
	if token == nil {
		t.Fatalf("pod has no projected ServiceAccount token: %+v", pod.Spec.Volumes)
	}
	if token.Audience != audience {
		t.Errorf("token audience = %q, want %q", token.Audience, audience)
	}
	if token.ExpirationSeconds == nil || *token.ExpirationSeconds < 600 || *token.ExpirationSeconds > 86400 {
		t.Errorf("token expirationSeconds = %v, want 600-86400 (the API's minimum is 600)", token.ExpirationSeconds)
	}
	c := pod.Spec.Containers[0]
	var mount *corev1.VolumeMount
	for i, m := range c.VolumeMounts {
		if m.Name == volume {
			mount = &c.VolumeMounts[i]
		}
	}
	if mount == nil || !mount.ReadOnly {
		t.Fatalf("token volume %s mounted as %+v, want read-only", volume, mount)
	}
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	if got, want := env["TS_ID_TOKEN_FILE"], filepath.Join(mount.MountPath, token.Path); got != want {
		t.Errorf("TS_ID_TOKEN_FILE = %q, want %q (the token's path)", got, want)
	}
	for _, k := range []string{"TS_AUTHKEY", "TS_CLIENT_SECRET", "TS_ID_TOKEN"} {
		if _, ok := env[k]; ok {
			t.Errorf("the component sets %s; keyless login conflicts with it", k)
		}
	}
}

// checkAdmittedRestricted applies objs to a real API server, with the
// namespace at PodSecurity level restricted, and creates pods in dry run.
func checkAdmittedRestricted(t *testing.T, objs []*unstructured.Unstructured, pods []*corev1.Pod) {
	t.Helper()
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	ctx := t.Context()
	enforceRestricted(t, admin)
	if err := kubetest.Apply(ctx, srv.Admin, objs, metav1.ApplyOptions{FieldManager: "kubectl"}); err != nil {
		t.Fatalf("apply: %v", err)
	}
	for _, pod := range pods {
		if _, err := admin.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
			t.Errorf("pod %s with the token volume is not admitted at PodSecurity level restricted: %v", pod.GenerateName+pod.Name, err)
		}
	}
}
