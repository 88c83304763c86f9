//go:build unix && !linux

package tailnettest

import "syscall"

// sysProcAttr puts a child in its own process group. Without Pdeathsig,
// only TS_PARENT_DEATH_FD (honoured by tailscaled) ties it to the caller.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
