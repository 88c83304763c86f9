package image_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/tsrelay/tsrelay/internal/testenv"
)

// TestReleaseManifests runs make release-manifests as the release workflow
// does: it must stamp the image into the rendered manifests, leave the
// committed ones alone, and refuse a version that is not a release's.
func TestReleaseManifests(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		testenv.SkipUnlessAllowed(t, "make not found")
	}
	kustomization := filepath.Join("..", "manifests", "kustomization.yaml")
	before, err := os.ReadFile(kustomization)
	if err != nil {
		t.Fatal(err)
	}
	const digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	images := regexp.MustCompile(`(?m)^\s+image: (\S+)$`)

	for _, tc := range []struct {
		args []string
		want string // the only image in install.yaml; empty: make must fail
	}{
		{[]string{"VERSION=v1.2.3"}, "ghcr.io/tsrelay/relay:v1.2.3"},
		{[]string{"VERSION=v1.3.0-rc.1", "IMAGE=ghcr.io/fork/relay", "DIGEST=" + digest}, "ghcr.io/fork/relay:v1.3.0-rc.1@" + digest},
		{[]string{"VERSION=1.2.3"}, ""},
		{[]string{"VERSION=v1.2"}, ""},
		{[]string{"VERSION=v01.2.3"}, ""},
		{[]string{"VERSION=v1.2.3", "DIGEST=latest"}, ""},
	} {
		dist := t.TempDir()
		cmd := exec.CommandContext(t.Context(), "make", append([]string{"-s", "release-manifests", "DIST=" + dist}, tc.args...)...)
		cmd.Dir = ".."
		cmd.Env = makeEnv()
		out, err := cmd.CombinedOutput()
		got, readErr := os.ReadFile(filepath.Join(dist, "install.yaml"))
		if tc.want == "" {
			if err == nil || readErr == nil {
				t.Errorf("make release-manifests %q succeeded, want a refusal\n%s", tc.args, out)
			}
			continue
		}
		if err != nil || readErr != nil {
			t.Errorf("make release-manifests %q: %v, %v\n%s", tc.args, err, readErr, out)
			continue
		}
		var found []string
		for _, m := range images.FindAllSubmatch(got, -1) {
			found = append(found, string(m[1]))
		}
		if len(found) != 1 || found[0] != tc.want {
			t.Errorf("make release-manifests %q: images %q, want [%s]", tc.args, found, tc.want)
		}
	}
	if after, err := os.ReadFile(kustomization); err != nil || !bytes.Equal(after, before) {
		t.Errorf("make release-manifests changed manifests/kustomization.yaml (err %v)", err)
	}
}

// makeEnv is this process's environment without what would change the
// Makefile's defaults: its variables, and the flags of a make that runs
// this test (make test IMAGE=… would reach the inner make through MAKEFLAGS).
func makeEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case "VERSION", "IMAGE", "DIGEST", "DIST", "MAKEFLAGS", "MFLAGS", "MAKELEVEL":
			continue
		}
		env = append(env, kv)
	}
	return env
}
