//go:build linux

package cluster_test

import (
	"context"
	"os/exec"
)

// execOutput runs a program and returns its combined output.
func execOutput(ctx context.Context, name string, args ...string) ([]byte, error) {
	return exec.CommandContext(ctx, name, args...).CombinedOutput()
}
