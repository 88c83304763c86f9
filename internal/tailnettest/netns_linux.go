package tailnettest

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// DialInNetns dials addr from inside the named network namespace netns
// (`ip netns add`): the socket is created there, and stays there, while the
// rest of this process stays where it is. Tests and the bench use it to
// reach a server that listens on a namespace's own loopback.
func DialInNetns(ctx context.Context, netns, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// A thread's namespace is per thread: hold this one, switch it,
		// dial, and switch it back before letting go. If switching back
		// fails the goroutine exits still locked, and Go ends the thread
		// rather than reuse it in the wrong namespace.
		runtime.LockOSThread()
		c, err, restored := dialOnThread(ctx, netns, network, addr)
		if restored {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func dialOnThread(ctx context.Context, netns, network, addr string) (c net.Conn, err error, restored bool) {
	orig, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
	if err != nil {
		return nil, fmt.Errorf("dial %s in netns %s: %w", addr, netns, err), true
	}
	defer orig.Close()
	target, err := os.Open("/run/netns/" + netns)
	if err != nil {
		return nil, fmt.Errorf("dial %s in netns %s: %w", addr, netns, err), true
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("dial %s in netns %s: setns: %w", addr, netns, err), true
	}
	var d net.Dialer
	c, err = d.DialContext(ctx, network, addr)
	if err != nil {
		err = fmt.Errorf("dial %s in netns %s: %w", addr, netns, err)
	}
	return c, err, unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil
}
