package tailnettest

import "syscall"

// sysProcAttr puts a child in its own process group and has the kernel kill
// it when the thread that started it dies. Go only ends a thread when a
// goroutine exits while locked to it, which this package never does.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
