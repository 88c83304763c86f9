package image_test

import (
	"bufio"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tsrelay/tsrelay/internal/testenv"
)

// nonroot is the image's USER, uid and gid, and the manifests' runAsUser.
const nonroot = 65532

// The relay's ports in the Deployment. The relay runs in a network
// namespace of its own, as in a pod, so they are free.
const (
	relayPort = "61441"
	httpAddr  = "127.0.0.1:9002"
)

// caBundle is where the Dockerfile puts the CA certificates, copied from
// the Debian build image; this machine's Debian or Ubuntu has the same file.
const caBundle = "/etc/ssl/certs/ca-certificates.crt"

// TestRunsAsNonRootInEmptyRoot runs the relay the way the image and the
// manifests run it, short of a container engine: chrooted into a directory
// that holds only what the scratch image holds (/relay and the CA bundle),
// read-only (readOnlyRootFilesystem), with a tmpfs at /tmp owned by the
// user (the pod's emptyDir), as uid and gid 65532 with no supplementary
// groups and no capabilities, in a network namespace with only loopback,
// and with only the TS_* environment a pod would give it (no HOME, no PATH,
// no KUBERNETES_*). The relay must serve /healthz there, write only under
// /tmp, and exit 0 on SIGTERM.
//
// Like every container runtime, the test mounts /proc: tsnet reads
// /proc/self/exe at start.
//
// The mounts and the network namespace belong to this test's OS thread
// alone (unshare on a locked thread), so nothing is mounted on the host, and
// they vanish with the thread even if the test is killed. Go starts new
// threads from a clean template thread, not from a locked one, so no other
// goroutine ever runs in them.
func TestRunsAsNonRootInEmptyRoot(t *testing.T) {
	p := hostPlatform(t)
	testenv.SkipUnlessRoot(t, "chroot, mounts and a network namespace; sudo make test-image runs it")
	bin := buildRelay(t, p)
	ca, err := os.ReadFile(caBundle)
	if err != nil {
		t.Fatalf("read the CA bundle to put in the image's place: %v (install Debian's ca-certificates)", err)
	}

	// Never unlocked: the thread ends with the test's goroutine, and with it
	// the namespaces.
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_NEWNET); err != nil {
		testenv.SkipUnlessAllowed(t, "cannot make private mount and network namespaces: %v", err)
	}
	// Keep this namespace's mounts from propagating back to the host's.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		t.Fatalf("make mounts private: %v", err)
	}
	if err := loopbackUp(); err != nil {
		t.Fatal(err)
	}

	root := t.TempDir()
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"relay", mustRead(t, bin), 0o755},
		{strings.TrimPrefix(caBundle, "/"), ca, 0o644},
	} {
		path := filepath.Join(root, f.name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, f.data, f.mode); err != nil {
			t.Fatal(err)
		}
	}
	// Mount points, which a container runtime makes for its own mounts.
	for _, dir := range []string{"tmp", "proc"} {
		if err := os.Mkdir(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	before := listTree(t, root)
	mountRoot(t, root)

	logPath := filepath.Join(t.TempDir(), "relay.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("relay log:\n%s", b)
		}
	})

	cmd := exec.Command("/relay") // a path inside the chroot
	cmd.Dir = "/"
	cmd.Env = []string{
		"TS_RELAY_SERVER_PORT=" + relayPort,
		"TS_STATE_DIR=/tmp/tsrelay",
		"TS_LOCAL_ADDR_PORT=" + httpAddr,
		// Belt and braces: loopback is the only interface anyway.
		"TS_NO_LOGS_NO_SUPPORT=true",
		"TS_DISABLE_PORTMAPPER=1",
		"TS_PANIC_IF_HIT_MAIN_CONTROL=1",
		// Unreachable, so the relay stays NeedsLogin, which is enough:
		// /healthz does not depend on the control server.
		"TS_CONTROL_URL=http://127.0.0.1:1",
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot: root,
		// Groups nil: setgroups clears root's supplementary groups.
		Credential: &syscall.Credential{Uid: nonroot, Gid: nonroot},
		// The relay dies with this thread, whatever becomes of the test.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the relay in %s: %v", root, err)
	}
	var exitErr error
	exited := make(chan struct{}) // closed once exitErr is set
	go func() { exitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
	})
	pid := cmd.Process.Pid

	// Generous for a loaded 2-core machine; it takes well under a second.
	const timeout = time.Minute
	waitFor(t, timeout, exited, "/healthz answering 200", func() bool {
		code, err := get(httpAddr, "/healthz")
		return err == nil && code == http.StatusOK
	})
	state := filepath.Join(root, "tmp", "tsrelay", "tailscaled.state")
	waitFor(t, timeout, exited, "node state in /tmp/tsrelay", func() bool {
		_, err := os.Stat(state)
		return err == nil
	})

	status := procStatus(t, pid)
	for key, want := range map[string]string{
		"Uid":    "65532\t65532\t65532\t65532",
		"Gid":    "65532\t65532\t65532\t65532",
		"Groups": "",
		"CapEff": "0000000000000000",
		"CapPrm": "0000000000000000",
	} {
		if got := status[key]; got != want {
			t.Errorf("relay's /proc/%d/status %s: %q, want %q", pid, key, got, want)
		}
	}
	if got, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/root"); err != nil || got != root {
		t.Errorf("relay's root is %q (err %v), want %q", got, err, root)
	}
	if fi, err := os.Stat(state); err == nil {
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != nonroot {
			t.Errorf("%s is owned by uid %d, want %d", state, st.Uid, nonroot)
		}
	}

	// The relay wrote nothing outside /tmp, and could not have: the root is
	// read-only even for root.
	if after := listTree(t, root); !slices.Equal(after, before) {
		t.Errorf("the root's files changed outside /tmp and /proc:\nbefore %q\nafter  %q", before, after)
	}
	if err := os.WriteFile(filepath.Join(root, "probe"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing to the root: %v, want %v", err, syscall.EROFS)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
		if exitErr != nil {
			t.Errorf("relay after SIGTERM: %v, want exit status 0", exitErr)
		}
	case <-time.After(15 * time.Second): // the manifests' terminationGracePeriodSeconds
		t.Errorf("relay still running 15 s after SIGTERM")
	}
}

// mountRoot makes root what the container runtime makes of the image: root
// bind-mounted read-only onto itself, a tmpfs owned by the user at /tmp
// (the emptyDir, with its size limit), and proc at /proc. t.Cleanup unmounts
// them before t.TempDir removes the directory.
func mountRoot(t *testing.T, root string) {
	t.Helper()
	var mounted []string
	t.Cleanup(func() {
		for _, m := range slices.Backward(mounted) {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", m, err)
			}
		}
	})
	mount := func(source, target, fstype string, flags uintptr, data string) {
		t.Helper()
		if err := unix.Mount(source, target, fstype, flags, data); err != nil {
			t.Fatalf("mount %s on %s: %v", source, target, err)
		}
		mounted = append(mounted, target)
	}
	mount(root, root, "", unix.MS_BIND, "")
	// A bind mount takes ro only on a remount.
	if err := unix.Mount("", root, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		t.Fatalf("remount %s read-only: %v", root, err)
	}
	mount("tmpfs", filepath.Join(root, "tmp"), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV,
		"size=64m,mode=0755,uid="+strconv.Itoa(nonroot)+",gid="+strconv.Itoa(nonroot))
	mount("proc", filepath.Join(root, "proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
}

// loopbackUp brings up lo in the calling thread's network namespace; a new
// namespace starts with it down.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return errors.New("bring up lo: " + err.Error())
	}
	return nil
}

// get fetches path from addr over a connection made on the calling thread,
// so in its network namespace. (http.Client dials on other goroutines,
// which run in the host's.)
func get(addr, path string) (int, error) {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	req, err := http.NewRequest("GET", "http://"+addr+path, nil)
	if err != nil {
		return 0, err
	}
	req.Close = true
	if err := req.Write(conn); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, err = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, err
}

// waitFor polls cond on the calling goroutine (it may need this thread's
// namespaces) until it holds, failing the test after timeout or if the
// relay exits first.
func waitFor(t *testing.T, timeout time.Duration, exited <-chan struct{}, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(timeout)
	for !cond() {
		select {
		case <-exited:
			t.Fatalf("relay exited while waiting for %s", what)
		case <-deadline:
			t.Fatalf("no %s after %v", what, timeout)
		case <-tick.C:
		}
	}
}

// procStatus returns the fields of /proc/pid/status, values trimmed.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	return fields
}

// listTree lists the files and directories under root with their modes
// and sizes, and the mount points /tmp and /proc by name only.
func listTree(t *testing.T, root string) []string {
	t.Helper()
	var list []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if rel == "tmp" || rel == "proc" {
			list = append(list, rel)
			return filepath.SkipDir
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		list = append(list, rel+" "+info.Mode().String()+" "+strconv.FormatInt(info.Size(), 10))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return list
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
