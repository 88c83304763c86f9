//go:build linux

package kubecluster

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tsrelay/tsrelay/internal/cmdline"
	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/testenv"
)

// Variables by which RunForTest tells the copy of the test it starts what
// it is.
const (
	childEnv  = "TSRELAY_KUBECLUSTER_TEST" // the test's name
	cgroupEnv = "TSRELAY_KUBECLUSTER_CGROUP"
)

// programs are what Start runs from the assets directory.
var programs = []string{"etcd", "kube-apiserver", "kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kubectl", "containerd", "ctr", "runc", "cni/bridge", "cni/host-local", "cni/loopback"}

// AssetsForTest returns the directory scripts/kube-cluster-bins fills
// ($TSRELAY_KUBE_ASSETS, or the cache it defaults to). When a program is
// missing it fails the test if skips are not allowed (see testenv) or
// $TSRELAY_KUBE_ASSETS is set, and otherwise skips it, saying how to get
// them.
func AssetsForTest(t testing.TB) string {
	t.Helper()
	dir, err := kubetest.Assets()
	if err == nil {
		for _, p := range programs {
			if _, statErr := os.Stat(filepath.Join(dir, p)); statErr != nil {
				err = fmt.Errorf("no %s in %s: run scripts/kube-cluster-bins (make test does) and set %s to the directory it prints", p, dir, kubetest.AssetsEnv)
				break
			}
		}
	}
	if err != nil {
		if env := os.Getenv(kubetest.AssetsEnv); env != "" {
			t.Fatalf("no real cluster, though %s=%s: %v", kubetest.AssetsEnv, env, err)
		}
		testenv.SkipUnlessAllowed(t, "no real cluster: %v", err)
	}
	return dir
}

// RunForTest runs body in a copy of the test binary, for t alone, in new
// network and mount namespaces and a cgroup tree of its own, and fails t
// if the copy fails. There the mounts are private (with fresh /run and
// /var/lib/cni), and the kernel settings the kubelet would change for the
// whole machine (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops,
// ...) read as it wants them, so that it leaves the real ones alone. Once
// the copy exits, whatever is left in its cgroup tree (pods, shims) is
// killed and the tree removed; its namespaces, and with them every
// interface, route, iptables rule and mount it made, are gone.
func RunForTest(t *testing.T, body func(t *testing.T)) {
	t.Helper()
	if os.Getenv(childEnv) == t.Name() {
		if err := isolate(); err != nil {
			t.Fatal(err)
		}
		if err := joinCgroup(os.Getenv(cgroupEnv)+"/harness", 0); err != nil {
			t.Fatal(err)
		}
		if err := cmdline.Run(t.Context(), "ip link set lo up"); err != nil {
			t.Fatal(err)
		}
		body(t)
		return
	}
	testenv.SkipUnlessRoot(t, "a Kubernetes node: network and mount namespaces, cgroups, containers")
	AssetsForTest(t)
	if _, err := exec.LookPath("ip"); err != nil {
		testenv.SkipUnlessAllowed(t, "needs iproute2's ip and iptables (scripts/net-tools installs them)")
	}
	if _, err := hierarchies(); err != nil {
		testenv.SkipUnlessAllowed(t, "cannot run a kubelet: %v", err)
	}
	cgroup := randomName("/tsrelay-cluster-")
	var pattern []string
	for part := range strings.SplitSeq(t.Name(), "/") {
		pattern = append(pattern, "^"+regexp.QuoteMeta(part)+"$")
	}
	// Subtests chosen with -run Test/sub: the copy runs the same ones.
	if f := flag.Lookup("test.run"); f != nil {
		if parts := strings.Split(f.Value.String(), "/"); len(parts) > len(pattern) {
			pattern = append(pattern, parts[len(pattern):]...)
		}
	}
	args := []string{"-test.run=" + strings.Join(pattern, "/"), "-test.count=1", "-test.v"}
	if f := flag.Lookup("test.timeout"); f != nil {
		args = append(args, "-test.timeout="+f.Value.String())
	}
	cmd := exec.CommandContext(t.Context(), os.Args[0], args...)
	cmd.Env = append(os.Environ(), childEnv+"="+t.Name(), cgroupEnv+"="+cgroup)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if testing.Verbose() {
		cmd.Stdout = io.MultiWriter(&out, os.Stdout)
		cmd.Stderr = cmd.Stdout
	}
	err := cmd.Run()
	if cerr := removeCgroup(cgroup); cerr != nil {
		t.Errorf("clean up after the cluster: %v", cerr)
	}
	if !testing.Verbose() {
		t.Logf("in its own namespaces:\n%s", out.Bytes())
	}
	if err != nil {
		t.Fatalf("test in its own namespaces: %v", err)
	}
	if bytes.Contains(out.Bytes(), []byte("--- SKIP: "+t.Name())) {
		testenv.SkipUnlessAllowed(t, "skipped in its own namespaces (see the log above)")
	}
	if !bytes.Contains(out.Bytes(), []byte("--- PASS: "+t.Name())) {
		t.Fatalf("test in its own namespaces did not run %s", t.Name())
	}
}

// kernelDefaults are the kernel settings the kubelet sets when they differ
// (KernelTunableModify in pkg/kubelet/cm): machine-wide ones, which a
// test must not change.
var kernelDefaults = map[string]string{
	"/proc/sys/vm/overcommit_memory":      "1",
	"/proc/sys/vm/panic_on_oom":           "0",
	"/proc/sys/kernel/panic":              "10",
	"/proc/sys/kernel/panic_on_oops":      "1",
	"/proc/sys/kernel/keys/root_maxkeys":  "1000000",
	"/proc/sys/kernel/keys/root_maxbytes": "25000000",
}

// isolate makes this process's (new) mount namespace private and gives it
// its own /run and /var/lib/cni, and makes the kernel settings the kubelet
// checks read as it wants them, in this mount namespace only.
func isolate() error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	for _, dir := range []string{"/run", "/var/lib/cni"} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := unix.Mount("tsrelay-cluster", dir, "tmpfs", 0, "mode=755"); err != nil {
			return fmt.Errorf("mount a tmpfs on %s: %w", dir, err)
		}
	}
	dir, err := os.MkdirTemp("/run", "sysctl")
	if err != nil {
		return err
	}
	for path, want := range kernelDefaults {
		got, err := os.ReadFile(path)
		if err != nil || strings.TrimSpace(string(got)) == want {
			continue
		}
		f := filepath.Join(dir, filepath.Base(filepath.Dir(path))+"."+filepath.Base(path))
		if err := os.WriteFile(f, []byte(want+"\n"), 0o644); err != nil {
			return err
		}
		if err := unix.Mount(f, path, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("mask %s: %w", path, err)
		}
	}
	return nil
}

// StartForTest starts a cluster for a test that RunForTest runs, in
// t.TempDir(), importing images. It fails the test if the cluster does not
// start, and stops it in t.Cleanup, logging the tails of its programs' logs
// if the test failed.
func StartForTest(t *testing.T, images ...Image) *Cluster {
	t.Helper()
	if os.Getenv(childEnv) != t.Name() {
		t.Fatal("kubecluster.StartForTest outside kubecluster.RunForTest")
	}
	assets := AssetsForTest(t)
	dir := t.TempDir()
	c, err := Start(t.Context(), Options{
		Assets:     assets,
		Dir:        dir,
		CgroupRoot: os.Getenv(cgroupEnv),
		Images:     images,
		Log:        slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	})
	if err != nil {
		t.Fatalf("start the cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range []string{"kubelet", "containerd", "kube-proxy", "kube-controller-manager", "kube-apiserver"} {
				t.Logf("%s log tail:\n%s", p, c.LogTail(p, 40))
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("stop the cluster: %v", err)
		}
	})
	return c
}

// testWriter writes each line to t.Log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// Kubectl runs kubectl with the cluster's admin kubeconfig and returns its
// combined output; on failure the error holds the arguments and output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, c.KubectlPath, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.Kubeconfig)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return out, nil
}
