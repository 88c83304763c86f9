//go:build unix && !linux

package tailnettest

import (
	"errors"
	"os/exec"
	"syscall"
)

// sysProcAttr puts a child in its own process group. Without Pdeathsig,
// only TS_PARENT_DEATH_FD (honoured by tailscaled) ties it to the caller.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// startIn starts cmd; a network namespace exists on Linux only.
func startIn(netnsPath string, cmd *exec.Cmd) error {
	if netnsPath != "" {
		return errors.New("network namespaces exist on Linux only")
	}
	return cmd.Start()
}
