package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// buildContainerboot builds Tailscale's containerboot (the tailscale/tailscale
// image's entry point) at the version go.mod pins, stripped and static like
// the other binaries, into dir. It needs modules this module does not
// require (the Kubernetes operator's), so it is built in a throwaway module
// next to it; a second call finds it built.
func buildContainerboot(ctx context.Context, dir string) error {
	out := filepath.Join(dir, "containerboot")
	ver := tailscaleModVersion()
	stamp := out + ".version"
	if b, err := os.ReadFile(stamp); err == nil && string(b) == ver {
		return nil
	}
	if ver == "" {
		return errors.New("no tailscale.com version in this program's build info")
	}
	mod, err := os.MkdirTemp("", "tsrelay-containerboot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(mod)
	if err := os.WriteFile(filepath.Join(mod, "go.mod"), []byte("module containerbootbuild\n\ngo 1.26\n"), 0o644); err != nil {
		return err
	}
	absOut, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	for _, args := range [][]string{
		{"get", "tailscale.com/cmd/containerboot@" + ver},
		{"build", "-trimpath", "-ldflags=-s -w", "-o", absOut, "tailscale.com/cmd/containerboot"},
	} {
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = mod
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local")
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go %s: %w\n%s", args[0], err, lastLines(string(b), 5))
		}
	}
	return os.WriteFile(stamp, []byte(ver), 0o644)
}

// binSize is the size of a file in bytes.
func binSize(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// addSizes compares the relay binary with what the tailscale/tailscale
// image carries: tailscaled, tailscale and containerboot (left out, with a
// note, if it was not built).
func (r *Report) addSizes(bins tailnettest.Binaries, containerboot string) error {
	relay, err := binSize(bins.Relay)
	if err != nil {
		return err
	}
	tsd, err := binSize(bins.Tailscaled)
	if err != nil {
		return err
	}
	ts, err := binSize(bins.Tailscale)
	if err != nil {
		return err
	}
	const mb = 1e6
	name, total := "tailscaled + tailscale", tsd+ts
	note := fmt.Sprintf("tailscaled %.1f MB, tailscale %.1f MB", float64(tsd)/mb, float64(ts)/mb)
	if cb, err := binSize(containerboot); err == nil {
		name, total = "tailscaled + tailscale + containerboot", total+cb
		note += fmt.Sprintf(", containerboot %.1f MB", float64(cb)/mb)
	} else {
		note += "; containerboot not built in this run"
	}
	r.add(Row{Section: "footprint", Scenario: "tsrelay", Metric: "stripped binary size (relay)", Unit: "MB", Value: float64(relay) / mb, Better: "lower"},
		name, float64(total)/mb, true)
	r.add(Row{Section: "footprint", Scenario: "stock", Metric: "stripped binary size (" + name + ")", Unit: "MB", Value: float64(total) / mb, Better: "lower",
		Note: note}, "", 0, false)
	return nil
}
