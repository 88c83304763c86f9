package tailnettest

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// sysProcAttr puts a child in its own process group and has the kernel kill
// it when the thread that started it dies. Go only ends a thread when a
// goroutine exits while locked to it, which this package never does.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// startIn starts cmd in the network namespace netnsPath (if not empty): it
// forks from a thread switched into the namespace, so the child starts
// there, and switches the thread back. If switching back fails the
// goroutine exits still locked, and Go ends the thread rather than reuse it
// in the wrong namespace; that also kills the child (Pdeathsig), which
// then reports an error through Wait.
func startIn(netnsPath string, cmd *exec.Cmd) error {
	if netnsPath == "" {
		return cmd.Start()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err, restored := startOnThread(netnsPath, cmd)
		if restored {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

func startOnThread(netnsPath string, cmd *exec.Cmd) (err error, restored bool) {
	orig, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
	if err != nil {
		return fmt.Errorf("start in netns %s: %w", netnsPath, err), true
	}
	defer orig.Close()
	target, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("start in netns %s: %w", netnsPath, err), true
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("start in netns %s: setns: %w", netnsPath, err), true
	}
	err = cmd.Start()
	return err, unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil
}
