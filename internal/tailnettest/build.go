package tailnettest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Packages built by Build. The Tailscale commands come from the version
// pinned in go.mod (its tool block keeps their go.sum entries), so the
// laptops run the same Tailscale as the relay.
const (
	tailscaledPkg = "tailscale.com/cmd/tailscaled"
	tailscalePkg  = "tailscale.com/cmd/tailscale"
	relayPkg      = "./cmd/relay"
)

// Binaries holds the paths of built executables. A field is empty when that
// binary was not built.
type Binaries struct {
	Tailscaled string // tailscaled, the daemon each laptop runs
	Tailscale  string // tailscale, the CLI
	Relay      string // this module's cmd/relay
}

// Build builds tailscaled and tailscale, as Tailscale ships them, and
// ./cmd/relay, with the tags the release build uses (cmd/relay/build-tags),
// into dir. It runs from the module root (found with `go env GOMOD`, so the
// working directory must be inside the module) with CGO_ENABLED=0.
func Build(ctx context.Context, dir string) (Binaries, error) {
	if err := goBuild(ctx, dir, "", tailscaledPkg, tailscalePkg); err != nil {
		return Binaries{}, err
	}
	relay, err := BuildRelay(ctx, dir)
	if err != nil {
		return Binaries{}, err
	}
	return Binaries{
		Tailscaled: filepath.Join(dir, "tailscaled"),
		Tailscale:  filepath.Join(dir, "tailscale"),
		Relay:      relay,
	}, nil
}

// BuildRelay builds ./cmd/relay as Build does, with extraTags added to the
// release tags (tsrelay_upstream_relayserver, say), into dir, and returns
// the binary's path.
func BuildRelay(ctx context.Context, dir string, extraTags ...string) (string, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return "", err
	}
	tags, err := os.ReadFile(filepath.Join(root, "cmd", "relay", "build-tags"))
	if err != nil {
		return "", fmt.Errorf("read the relay's build tags: %w", err)
	}
	all := strings.Join(append([]string{strings.TrimSpace(string(tags))}, extraTags...), ",")
	if err := goBuild(ctx, dir, all, relayPkg); err != nil {
		return "", err
	}
	return filepath.Join(dir, "relay"), nil
}

// BuildClients is Build without the relay: it builds only tailscaled and
// tailscale, so it works while cmd/relay does not compile. Relay is empty in
// the result.
func BuildClients(ctx context.Context, dir string) (Binaries, error) {
	if err := goBuild(ctx, dir, "", tailscaledPkg, tailscalePkg); err != nil {
		return Binaries{}, err
	}
	return Binaries{
		Tailscaled: filepath.Join(dir, "tailscaled"),
		Tailscale:  filepath.Join(dir, "tailscale"),
	}, nil
}

// CheckoutBinDir returns a directory under the system's temporary one for
// binaries built from this checkout: name plus a hash of the module root, so
// that two checkouts on one machine (a developer's and CI's clone, say)
// never run each other's relay.
func CheckoutBinDir(ctx context.Context, name string) (string, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256([]byte(root))
	return filepath.Join(os.TempDir(), fmt.Sprintf("%s-%x", name, sum[:4])), nil
}

// goBuild runs `go build -tags tags -o dir/ pkgs...` from the module root.
func goBuild(ctx context.Context, dir, tags string, pkgs ...string) error {
	root, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("build into %s: %w", dir, err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return fmt.Errorf("build into %s: %w", dir, err)
	}
	// A trailing separator makes -o a directory, so one invocation can
	// write several commands, each named after its package.
	// Stripped like a release build (see the Makefile), so that tests can
	// check the relay's size budget on the binary they run. Linker flags do
	// not change the compile cache, so the test binaries share it.
	args := append([]string{"build", "-tags=" + tags, "-ldflags=-s -w", "-o", abs + string(filepath.Separator)}, pkgs...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", strings.Join(pkgs, " "), err, out)
	}
	return nil
}

// moduleRoot returns the directory of the go.mod that governs the working
// directory.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find module root with go env GOMOD: %w", err)
	}
	gomod := string(bytes.TrimSpace(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find module root: working directory is not inside a Go module (GOMOD=%q)", gomod)
	}
	return filepath.Dir(gomod), nil
}
