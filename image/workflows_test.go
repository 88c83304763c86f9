package image_test

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// workflow is the part of a GitHub Actions workflow these tests read.
type workflow struct {
	On map[string]any `json:"on"`
	// sigs.k8s.io/yaml reads YAML 1.1, in which a bare `on` key is the
	// boolean true; GitHub reads it as the string "on".
	OnYAML11    map[string]any    `json:"true"`
	Permissions map[string]string `json:"permissions"`
	Jobs        map[string]job    `json:"jobs"`
}

type job struct {
	Permissions map[string]string `json:"permissions"`
	Steps       []step            `json:"steps"`
}

type step struct {
	ID   string            `json:"id"`
	Uses string            `json:"uses"`
	Run  string            `json:"run"`
	With map[string]any    `json:"with"`
	Env  map[string]string `json:"env"`
}

// with returns a step input as text.
func (s step) with(key string) string {
	v, ok := s.With[key]
	if !ok {
		return ""
	}
	return fmt.Sprint(v)
}

// readWorkflow parses .github/workflows/name and checks what every workflow
// here must do: read-only permissions unless a job asks for more, actions
// pinned to a major version, and no QEMU (the Dockerfile cross-compiles).
func readWorkflow(t *testing.T, name string) workflow {
	t.Helper()
	b, err := os.ReadFile("../.github/workflows/" + name)
	if err != nil {
		t.Fatal(err)
	}
	var wf workflow
	if err := yaml.Unmarshal(b, &wf); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if wf.On == nil {
		wf.On = wf.OnYAML11
	}
	if got := wf.Permissions; len(got) != 1 || got["contents"] != "read" {
		t.Errorf("%s: top-level permissions %v, want contents: read only", name, got)
	}
	pinned := regexp.MustCompile(`^[\w.-]+/[\w.-]+@v\d+$`)
	for jobName, j := range wf.Jobs {
		for _, s := range j.Steps {
			if s.Uses != "" && !pinned.MatchString(s.Uses) {
				t.Errorf("%s: job %s uses %s; pin actions to a major version, owner/name@vN", name, jobName, s.Uses)
			}
			if strings.HasPrefix(s.Uses, "docker/setup-qemu-action@") {
				t.Errorf("%s: job %s sets up QEMU; the Dockerfile cross-compiles, so emulation only slows the build", name, jobName)
			}
		}
	}
	return wf
}

// findStep returns the step of j that uses action (owner/name), and its
// index.
func findStep(j job, action string) (step, int, bool) {
	for i, s := range j.Steps {
		if strings.HasPrefix(s.Uses, action+"@") {
			return s, i, true
		}
	}
	return step{}, -1, false
}

// findJob returns the job with a step that uses action.
func findJob(wf workflow, action string) (job, bool) {
	for _, j := range wf.Jobs {
		if _, _, ok := findStep(j, action); ok {
			return j, true
		}
	}
	return job{}, false
}

// releasePlatforms are the platforms of the release, as buildx spells them.
func releasePlatforms() []string {
	var names []string
	for _, p := range platforms {
		names = append(names, p.name)
	}
	return names
}

// checkPlatforms checks that a build-push step builds every release platform.
func checkPlatforms(t *testing.T, file string, build step) {
	t.Helper()
	got := strings.Split(build.with("platforms"), ",")
	for i := range got {
		got[i] = strings.TrimSpace(got[i])
	}
	slices.Sort(got)
	want := releasePlatforms()
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s: build-push-action platforms %q, want %q", file, got, want)
	}
}

func TestCIWorkflow(t *testing.T) {
	wf := readWorkflow(t, "ci.yml")
	if _, ok := wf.On["pull_request"]; !ok {
		t.Errorf("ci.yml does not run on pull_request")
	}
	push, _ := wf.On["push"].(map[string]any)
	if branches, _ := push["branches"].([]any); !slices.Contains(branches, any("main")) {
		t.Errorf("ci.yml does not run on pushes to main: on.push = %v", wf.On["push"])
	}

	tests, ok := findJob(wf, "actions/setup-go")
	if !ok {
		t.Fatal("ci.yml: no job sets up Go")
	}
	if s, _, _ := findStep(tests, "actions/setup-go"); s.with("go-version-file") != "go.mod" {
		t.Errorf("ci.yml: setup-go go-version-file %q, want go.mod, the one place the Go version is set", s.with("go-version-file"))
	}
	if !slices.ContainsFunc(tests.Steps, func(s step) bool { return strings.TrimSpace(s.Run) == "make test" }) {
		t.Errorf("ci.yml: the Go job does not run make test")
	}

	images, ok := findJob(wf, "docker/build-push-action")
	if !ok {
		t.Fatal("ci.yml: no job builds the image")
	}
	build, _, _ := findStep(images, "docker/build-push-action")
	checkPlatforms(t, "ci.yml", build)
	if build.with("push") != "false" {
		t.Errorf("ci.yml: build-push-action push = %q, want false: pull requests must not publish", build.with("push"))
	}
}

func TestReleaseWorkflow(t *testing.T) {
	wf := readWorkflow(t, "release.yml")
	if len(wf.On) != 1 {
		t.Errorf("release.yml runs on %v, want tag pushes only", wf.On)
	}
	push, _ := wf.On["push"].(map[string]any)
	if tags := fmt.Sprint(push["tags"]); tags != "[v*]" {
		t.Errorf("release.yml on.push.tags = %s, want [v*]", tags)
	}

	image, ok := findJob(wf, "docker/build-push-action")
	if !ok {
		t.Fatal("release.yml: no job builds the image")
	}
	for perm, want := range map[string]string{"contents": "read", "packages": "write", "id-token": "write"} {
		if got := image.Permissions[perm]; got != want {
			t.Errorf("release.yml: the image job's permission %s = %q, want %q", perm, got, want)
		}
	}
	build, buildAt, _ := findStep(image, "docker/build-push-action")
	checkPlatforms(t, "release.yml", build)
	for key, want := range map[string]string{"push": "true", "sbom": "true", "provenance": "mode=max"} {
		if got := build.with(key); got != want {
			t.Errorf("release.yml: build-push-action %s = %q, want %q", key, got, want)
		}
	}
	if !strings.Contains(build.with("build-args"), "VERSION=${{ github.ref_name }}") {
		t.Errorf("release.yml: build-args %q do not stamp the tag as VERSION", build.with("build-args"))
	}
	if _, _, ok := findStep(image, "docker/login-action"); !ok {
		t.Errorf("release.yml: the image job does not log in to the registry")
	}
	meta, _, ok := findStep(image, "docker/metadata-action")
	if !ok || build.with("tags") != "${{ steps."+meta.ID+".outputs.tags }}" {
		t.Errorf("release.yml: the image is not tagged by docker/metadata-action (tags %q)", build.with("tags"))
	}
	var patterns []string
	for line := range strings.Lines(meta.with("tags")) {
		if m := regexp.MustCompile(`^type=semver,pattern=([^,]+)`).FindStringSubmatch(strings.TrimSpace(line)); m != nil {
			patterns = append(patterns, m[1])
		}
	}
	// With the git tag's v: make release-manifests stamps the manifests
	// with the git tag, VERSION=vX.Y.Z.
	for _, want := range []string{"v{{version}}", "v{{major}}.{{minor}}", "v{{major}}"} {
		if !slices.Contains(patterns, want) {
			t.Errorf("release.yml: metadata-action has semver tags %q, none %s", patterns, want)
		}
	}

	// Signed after the push, by digest.
	_, installAt, ok := findStep(image, "sigstore/cosign-installer")
	if !ok {
		t.Fatal("release.yml: cosign is never installed")
	}
	signAt := slices.IndexFunc(image.Steps, func(s step) bool { return strings.Contains(s.Run, "cosign sign --yes") })
	if signAt < 0 {
		t.Fatal("release.yml: no step runs cosign sign --yes")
	}
	sign := image.Steps[signAt]
	if !(buildAt < signAt && installAt < signAt) {
		t.Errorf("release.yml: cosign sign (step %d) must follow the build (%d) and the cosign install (%d)", signAt, buildAt, installAt)
	}
	if !strings.Contains(sign.Run, "@${DIGEST}") || sign.Env["DIGEST"] != "${{ steps."+build.ID+".outputs.digest }}" {
		t.Errorf("release.yml: cosign signs %q with DIGEST=%q, want the digest build-push-action (id %q) pushed", sign.Run, sign.Env["DIGEST"], build.ID)
	}

	// install.yaml, stamped with the release's image, on the release.
	assets, ok := findJob(wf, "softprops/action-gh-release")
	if !ok {
		t.Fatal("release.yml: nothing attaches install.yaml to the release")
	}
	if !slices.ContainsFunc(assets.Steps, func(s step) bool { return strings.HasPrefix(s.Run, "make release-manifests ") }) {
		t.Errorf("release.yml: the release job does not run make release-manifests")
	}
	if gh, _, _ := findStep(assets, "softprops/action-gh-release"); gh.with("files") != "dist/install.yaml" {
		t.Errorf("release.yml: the release gets %q, want dist/install.yaml", gh.with("files"))
	}
	if assets.Permissions["contents"] != "write" {
		t.Errorf("release.yml: the release job needs contents: write to create the release")
	}
}

// TestMakefilePlatforms keeps make image building what the release builds.
func TestMakefilePlatforms(t *testing.T) {
	b, err := os.ReadFile("../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^PLATFORMS \?= (.+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("the Makefile sets no PLATFORMS")
	}
	if got, want := string(m[1]), strings.Join(releasePlatforms(), ","); got != want {
		t.Errorf("Makefile PLATFORMS = %s, want %s", got, want)
	}
}
