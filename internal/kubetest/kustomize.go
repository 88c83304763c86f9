package kubetest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// KustomizeForTest renders the kustomization in dir with the project's
// pinned kustomize (`go tool kustomize build`) and returns its output. root
// is the repository's root, relative to the test's directory. Every
// kustomization source under it (manifests, their components, examples) is
// read first: kustomize reads them in a child process, which go test's
// cache does not see, and reading them here makes an edit to any of them
// rerun the test instead of replaying a cached pass.
func KustomizeForTest(t testing.TB, root, dir string) []byte {
	t.Helper()
	for _, pattern := range []string{"manifests/*.yaml", "manifests/components/*/*.yaml", "manifests/components/*/*/*.yaml", "examples/*/*.yaml"} {
		files, err := filepath.Glob(filepath.Join(root, pattern))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if _, err := os.ReadFile(f); err != nil {
				t.Fatal(err)
			}
		}
	}
	cmd := exec.CommandContext(t.Context(), "go", "tool", "kustomize", "build", dir)
	cmd.Env = append(os.Environ(), "GOTOOLCHAIN=local")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kustomize build %s: %v\n%s", dir, err, stderr.Bytes())
	}
	return out
}

// KustomizeObjectsForTest is KustomizeForTest, parsed into objects.
func KustomizeObjectsForTest(t testing.TB, root, dir string) []*unstructured.Unstructured {
	t.Helper()
	objs, err := ParseManifests("kustomize build "+dir, KustomizeForTest(t, root, dir))
	if err != nil {
		t.Fatal(err)
	}
	return objs
}
