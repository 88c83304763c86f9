// Package netnstest runs a test's body in a private network namespace: the
// test binary re-runs itself, for that one test, in a child process made
// with CLONE_NEWNET. The namespace starts with only a down loopback and
// vanishes with the child, so the test may add interfaces and routes
// without touching the machine's own.
package netnstest

import (
	"errors"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/tsrelay/tsrelay/internal/testenv"
)

// childEnv marks the child process; its value is the name of the test to
// run inside.
const childEnv = "TSRELAY_NETNS_TEST"

// Run runs body in a new network namespace, with loopback up. In the
// parent it re-runs the test binary for t alone in the namespace and fails
// t if the child fails; in the child it calls body. It skips t when not
// root; when the namespace cannot be made or `ip` is missing it skips t
// only where skips are allowed (see testenv), and fails it otherwise.
func Run(t *testing.T, body func(t *testing.T)) {
	t.Helper()
	if os.Getenv(childEnv) == t.Name() {
		IP(t, "link", "set", "lo", "up")
		body(t)
		return
	}
	testenv.SkipUnlessRoot(t, "a network namespace")
	if _, err := exec.LookPath("ip"); err != nil {
		testenv.SkipUnlessAllowed(t, "needs iproute2's ip (scripts/net-tools installs it)")
	}
	var pattern []string
	for part := range strings.SplitSeq(t.Name(), "/") {
		pattern = append(pattern, "^"+regexp.QuoteMeta(part)+"$")
	}
	args := []string{"-test.run=" + strings.Join(pattern, "/"), "-test.count=1", "-test.v"}
	cmd := exec.CommandContext(t.Context(), os.Args[0], args...)
	cmd.Env = append(os.Environ(), childEnv+"="+t.Name())
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EINVAL) {
		testenv.SkipUnlessAllowed(t, "cannot make a network namespace: %v", err)
	}
	t.Logf("in a network namespace:\n%s", out)
	if err != nil {
		t.Fatalf("test in network namespace: %v", err)
	}
	if strings.Contains(string(out), "--- SKIP: "+t.Name()) {
		testenv.SkipUnlessAllowed(t, "skipped in the network namespace (see the log above)")
	}
	// A pattern that matched nothing passes too: make sure the body ran.
	if !strings.Contains(string(out), "--- PASS: "+t.Name()) {
		t.Fatalf("test in network namespace did not run %s", t.Name())
	}
}

// IP runs `ip args...` and fails t if it fails.
func IP(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.CommandContext(t.Context(), "ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
