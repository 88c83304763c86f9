// Package cmdline runs the short command lines (ip, iptables, sysctl) with
// which the bench's lab and the real-cluster harness build their networks.
package cmdline

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// Run runs each command line in turn, split on white space (no quoting),
// and stops at the first that fails, with its output in the error.
func Run(ctx context.Context, lines ...string) error {
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		out, err := exec.CommandContext(ctx, f[0], f[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %w: %s", l, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}
