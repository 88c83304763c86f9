// Package image_test checks what the container image promises without a
// container engine: the relay is built the way the Dockerfile builds it,
// static and without cgo, for every platform the release ships, and it runs
// as uid 65532 on an empty, read-only root like the one the scratch image
// gives it. Other tests check the Dockerfile, the .dockerignore, the GitHub
// workflows and make release-manifests.
package image_test

import (
	"context"
	"debug/buildinfo"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// testVersion is what the tests stamp into main.version.
const testVersion = "image-test"

// buildFlags are the Dockerfile's go build flags with VERSION=testVersion
// and the tags in cmd/relay/build-tags. TestDockerfile checks that the
// Dockerfile still uses them.
func buildFlags(t testing.TB) []string {
	return []string{"-trimpath", "-tags", buildTags(t), "-ldflags", "-s -w -X main.version=" + testVersion}
}

// buildTags returns cmd/relay/build-tags, the tags every build of the relay
// uses.
func buildTags(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile("../cmd/relay/build-tags")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// platform is one platform the image is built for.
type platform struct {
	name    string // as docker buildx names it
	goarch  string
	goarm   string // for arm only
	machine elf.Machine
}

// platforms are the platforms of the release (release.yml's platforms).
var platforms = []platform{
	{"linux/amd64", "amd64", "", elf.EM_X86_64},
	{"linux/arm64", "arm64", "", elf.EM_AARCH64},
	{"linux/arm/v7", "arm", "7", elf.EM_ARM},
}

// builds holds one build per platform name, so that the tests that need
// the same binary share it.
var builds sync.Map // platform name -> func() (string, error)

// buildRelay builds cmd/relay for p as the Dockerfile does and returns the
// binary's path. The binaries go to a directory that outlives the test run,
// so that go build skips an up-to-date link next time; a cold cross build
// takes minutes on 2 cores, a warm one seconds.
func buildRelay(t *testing.T, p platform) string {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping the relay build in -short mode")
	}
	flags := buildFlags(t)
	once, _ := builds.LoadOrStore(p.name, sync.OnceValues(func() (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		out := filepath.Join(os.TempDir(), "tsrelay-image-bin", strings.ReplaceAll(p.name, "/", "-"), "relay")
		args := append(append([]string{"build"}, flags...), "-o", out, "./cmd/relay")
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = ".." // the module root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+p.goarch, "GOARM="+p.goarm)
		if b, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build for %s: %v\n%s", p.name, err, b)
		}
		return out, nil
	}))
	path, err := once.(func() (string, error))()
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// hostPlatform returns the platform of this machine, if the image has one.
func hostPlatform(t *testing.T) platform {
	t.Helper()
	for _, p := range platforms {
		if p.goarch == runtime.GOARCH && runtime.GOOS == "linux" {
			return p
		}
	}
	t.Skipf("the image has no %s/%s variant to run here", runtime.GOOS, runtime.GOARCH)
	return platform{}
}

// checkStatic checks that the ELF file at path is for machine, statically
// linked (no program interpreter, no dynamic section, no shared libraries:
// it runs on an empty root) and stripped (no symbol table). It returns the
// file's size.
func checkStatic(t *testing.T, path string, machine elf.Machine) int64 {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Machine != machine {
		t.Errorf("%s is for %v, want %v", path, f.Machine, machine)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP || prog.Type == elf.PT_DYNAMIC {
			t.Errorf("%s has a %v program header: it is dynamically linked", path, prog.Type)
		}
	}
	if libs, err := f.ImportedLibraries(); err != nil || len(libs) > 0 {
		t.Errorf("%s imports shared libraries %q (err %v), want none", path, libs, err)
	}
	if f.Section(".symtab") != nil {
		t.Errorf("%s has a symbol table: not built with -ldflags -s", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// checkBuildSettings reads the build settings that `go version -m` prints
// (debug/buildinfo is its reader) and checks that the binary was built
// without cgo, with -trimpath, for p.
func checkBuildSettings(t *testing.T, path string, p platform) {
	t.Helper()
	info, err := buildinfo.ReadFile(path)
	if err != nil {
		t.Fatalf("read build info of %s: %v", path, err)
	}
	got := map[string]string{}
	for _, s := range info.Settings {
		got[s.Key] = s.Value
	}
	want := map[string]string{"CGO_ENABLED": "0", "-trimpath": "true", "GOOS": "linux", "GOARCH": p.goarch}
	if p.goarm != "" {
		want["GOARM"] = p.goarm
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: build setting %s = %q, want %q", p.name, k, got[k], v)
		}
	}
}

// sizeMB formats a size in bytes as the README and the size budget do.
func sizeMB(n int64) string { return fmt.Sprintf("%.1f MB (%d bytes)", float64(n)/1e6, n) }

// TestStaticBinary checks the amd64 binary the way `go version -m` and
// `file` would: built without cgo and with -trimpath, static, stripped, and
// stamped with its version.
func TestStaticBinary(t *testing.T) {
	p := platforms[0] // linux/amd64
	bin := buildRelay(t, p)
	checkBuildSettings(t, bin, p)
	t.Logf("%s stripped relay: %s", p.name, sizeMB(checkStatic(t, bin, p.machine)))

	// The version is stamped: run the binary where it can run.
	if runtime.GOOS == "linux" && runtime.GOARCH == p.goarch {
		out, err := exec.CommandContext(t.Context(), bin, "--version").Output()
		if err != nil {
			t.Fatalf("relay --version: %v", err)
		}
		if got, want := strings.TrimSpace(string(out)), "tsrelay "+testVersion; got != want {
			t.Errorf("relay --version = %q, want %q", got, want)
		}
	}
}

// TestCrossBuild builds every platform of the release, as buildx does on an
// amd64 runner: by cross-compiling, not under emulation. It logs each
// stripped size; TestBinarySize in cmd/relay holds amd64 to its budget.
func TestCrossBuild(t *testing.T) {
	for _, p := range platforms {
		t.Run(strings.ReplaceAll(p.name, "/", "_"), func(t *testing.T) {
			bin := buildRelay(t, p)
			checkBuildSettings(t, bin, p)
			t.Logf("%s stripped relay: %s", p.name, sizeMB(checkStatic(t, bin, p.machine)))
		})
	}
}
