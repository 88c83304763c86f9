package manifests_test

import (
	"bufio"
	"bytes"
	"debug/buildinfo"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/tsrelay/tsrelay/internal/testenv"
)

// KustomizeBinsEnv names the directory of kustomize-vX.Y.Z binaries that
// scripts/kustomize-bins builds and prints; make test sets it. Unset, the
// test looks in the cache the script fills.
const KustomizeBinsEnv = "TSRELAY_KUSTOMIZE_BINS"

// kustomizeBins returns the directory holding kustomize-<version> for
// every one of versions: $TSRELAY_KUSTOMIZE_BINS, or else the cache
// scripts/kustomize-bins fills. The error says how to get them.
func kustomizeBins(versions []string) (string, error) {
	dir := os.Getenv(KustomizeBinsEnv)
	if dir == "" {
		cache := os.Getenv("TSRELAY_CACHE")
		if cache == "" {
			base, err := os.UserCacheDir()
			if err != nil {
				return "", fmt.Errorf("%s is not set and there is no user cache dir: %w", KustomizeBinsEnv, err)
			}
			cache = filepath.Join(base, "tsrelay")
		}
		dir = filepath.Join(cache, "kustomize")
	}
	for _, v := range versions {
		if _, err := os.Stat(filepath.Join(dir, "kustomize-"+v)); err != nil {
			return "", fmt.Errorf("no kustomize-%s in %s: run `make test`, or run scripts/kustomize-bins once and set %s to the directory it prints", v, dir, KustomizeBinsEnv)
		}
	}
	return dir, nil
}

// kustomizeVersions reads the releases the examples must render alike
// with, from the list scripts/kustomize-bins builds.
func kustomizeVersions(t *testing.T) []string {
	t.Helper()
	f, err := os.Open("../scripts/kustomize-versions")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var vs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" && !strings.HasPrefix(line, "#") {
			vs = append(vs, line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(vs) == 0 {
		t.Fatal("scripts/kustomize-versions lists no version")
	}
	return vs
}

// renderWith runs `kustomize build dir` with the binary kustomize (argv
// before "build") and returns the objects, keyed by
// apiVersion/kind/namespace/name, so that order does not count.
func renderWith(t *testing.T, kustomize []string, dir string) (map[string]map[string]any, error) {
	t.Helper()
	args := append(slices.Clone(kustomize[1:]), "build", dir)
	cmd := exec.CommandContext(t.Context(), kustomize[0], args...)
	cmd.Env = append(os.Environ(), "GOTOOLCHAIN=local")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s build %s: %w: %s", strings.Join(kustomize, " "), dir, err, bytes.TrimSpace(stderr.Bytes()))
	}
	objs := map[string]map[string]any{}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(out), 4096)
	for {
		var o map[string]any
		if err := dec.Decode(&o); errors.Is(err, io.EOF) {
			return objs, nil
		} else if err != nil {
			return nil, fmt.Errorf("%s build %s: object %d: %w", kustomize[0], dir, len(objs)+1, err)
		}
		if len(o) == 0 {
			continue
		}
		md, _ := o["metadata"].(map[string]any)
		key := fmt.Sprintf("%v %v %v/%v", o["apiVersion"], o["kind"], md["namespace"], md["name"])
		if _, dup := objs[key]; dup {
			return nil, fmt.Errorf("%s build %s: %s twice", kustomize[0], dir, key)
		}
		objs[key] = o
	}
}

// diffObjects lists how got differs from want, object by object and, within
// an object, field by field (lists compared in order), at most max lines.
func diffObjects(want, got map[string]map[string]any, max int) []string {
	var out []string
	keys := map[string]bool{}
	for k := range want {
		keys[k] = true
	}
	for k := range got {
		keys[k] = true
	}
	sorted := make([]string, 0, len(keys))
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	for _, k := range sorted {
		w, inWant := want[k]
		g, inGot := got[k]
		switch {
		case !inGot:
			out = append(out, k+": missing")
		case !inWant:
			out = append(out, k+": extra object")
		default:
			diffValues(k+":", w, g, &out)
		}
	}
	if len(out) > max {
		out = append(out[:max], fmt.Sprintf("and %d more", len(out)-max))
	}
	return out
}

// diffValues appends to out the paths under path where got differs from
// want.
func diffValues(path string, want, got any, out *[]string) {
	wm, wok := want.(map[string]any)
	gm, gok := got.(map[string]any)
	if wok && gok {
		keys := map[string]bool{}
		for k := range wm {
			keys[k] = true
		}
		for k := range gm {
			keys[k] = true
		}
		sorted := make([]string, 0, len(keys))
		for k := range keys {
			sorted = append(sorted, k)
		}
		sort.Strings(sorted)
		for _, k := range sorted {
			p := path + " " + k
			if path[len(path)-1] != ':' {
				p = path + "." + k
			}
			w, inW := wm[k]
			g, inG := gm[k]
			switch {
			case !inG:
				*out = append(*out, fmt.Sprintf("%s: missing (want %s)", p, short(w)))
			case !inW:
				*out = append(*out, fmt.Sprintf("%s: extra %s", p, short(g)))
			default:
				diffValues(p, w, g, out)
			}
		}
		return
	}
	if !reflect.DeepEqual(want, got) {
		*out = append(*out, fmt.Sprintf("%s: %s, want %s", path, short(got), short(want)))
	}
}

// short formats v on one line, cut to a readable length.
func short(v any) string {
	s := strings.Join(strings.Fields(fmt.Sprint(v)), " ")
	if len(s) > 120 {
		s = s[:117] + "..."
	}
	return s
}

// TestKustomizeVersionsRenderAlike renders the base install, every example
// and the components in the other order components/derp documents with
// each kustomize release in scripts/kustomize-versions (kubectl 1.31-1.35
// embed v5.4.2-v5.7.1) and checks that each gives exactly the objects the
// project's own kustomize (go tool kustomize, go.mod's version) gives:
// kubectl apply -k must install the same thing whichever kubectl a user
// has.
func TestKustomizeVersionsRenderAlike(t *testing.T) {
	versions := kustomizeVersions(t)
	bins, err := kustomizeBins(versions)
	if err != nil {
		if os.Getenv(KustomizeBinsEnv) != "" {
			t.Fatal(err) // named, so promised
		}
		testenv.SkipUnlessAllowed(t, "%v", err)
	}
	readSources(t)

	// The components in the other order components/derp allows.
	derpFirst := t.TempDir()
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(derpFirst, repo)
	if err != nil {
		t.Fatal(err)
	}
	k := "namespace: kube-public\nresources: [" + rel + "/manifests]\ncomponents:\n"
	for _, c := range []string{"derp", "ha", "ha-derp", "monitoring"} {
		k += "- " + rel + "/manifests/components/" + c + "\n"
	}
	if err := os.WriteFile(filepath.Join(derpFirst, "kustomization.yaml"), []byte(k), 0o600); err != nil {
		t.Fatal(err)
	}
	dirs := []struct{ name, dir string }{
		{"manifests", "."},
		{"examples/derp", "../examples/derp"},
		{"examples/ha", "../examples/ha"},
		{"examples/ha-derp", "../examples/ha-derp"},
		{"examples/monitoring", "../examples/monitoring"},
		{"derp, ha, ha-derp, monitoring", derpFirst},
	}
	reference := []string{"go", "tool", "kustomize"}
	want := map[string]map[string]map[string]any{}
	for _, d := range dirs {
		objs, err := renderWith(t, reference, d.dir)
		if err != nil {
			t.Fatal(err)
		}
		want[d.name] = objs
	}

	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			bin := filepath.Join(bins, "kustomize-"+v)
			// Its build info, not `kustomize version`: releases before
			// v5.7 built with go install say "(devel)".
			info, err := buildinfo.ReadFile(bin)
			if err != nil {
				t.Fatalf("%v; run scripts/kustomize-bins", err)
			}
			if got := info.Main.Path + "@" + info.Main.Version; got != "sigs.k8s.io/kustomize/kustomize/v5@"+v {
				t.Fatalf("%s is %s, want sigs.k8s.io/kustomize/kustomize/v5@%s; delete it and run scripts/kustomize-bins", bin, got, v)
			}
			for _, d := range dirs {
				got, err := renderWith(t, []string{bin}, d.dir)
				if err != nil {
					t.Errorf("%s: %v", d.name, err)
					continue
				}
				if diff := diffObjects(want[d.name], got, 20); len(diff) > 0 {
					t.Errorf("kustomize %s renders %s unlike go tool kustomize:\n  %s", v, d.name, strings.Join(diff, "\n  "))
				}
			}
		})
	}
}

// readSources reads the kustomizations' sources, which kustomize reads in a
// child process that go test's cache does not see, so that an edit reruns
// the tests instead of replaying a cached pass.
func readSources(t *testing.T) {
	t.Helper()
	for _, pattern := range []string{"*.yaml", "components/*/*.yaml", "components/*/*/*.yaml", "../examples/*/*.yaml", "../scripts/kustomize-versions"} {
		files, err := filepath.Glob(pattern)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if _, err := os.ReadFile(f); err != nil {
				t.Fatal(err)
			}
		}
	}
}
