//go:build linux

package kubecluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The cluster's processes live in one cgroup tree, made here in every
// mounted hierarchy (this host has cgroup v1, with a cgroup2 hierarchy
// beside it): the kubelet puts pods under <root>/kubepods, containerd and
// its shims, which outlive containerd by design, go in <root>/runtime, and
// the test itself in <root>/harness. Whatever is left in the tree when the
// test ends is killed, and the tree removed.

// hierarchies returns the mount points of the cgroup hierarchies.
func hierarchies() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var dirs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// mountinfo: ID parent major:minor root mountpoint options ... - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if sep < 0 || sep+1 >= len(fields) || len(fields) < 5 {
			continue
		}
		if fs := fields[sep+1]; fs == "cgroup" || fs == "cgroup2" {
			dirs = append(dirs, unescapeMount(fields[4]))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(dirs) == 0 {
		return nil, errors.New("no cgroup hierarchy is mounted")
	}
	return dirs, nil
}

// makeCgroup makes cgroup path (e.g. /tsrelay-test-1234/harness) in every
// hierarchy. In the cpuset hierarchy a new cgroup has no CPUs or memory
// nodes until given its parent's.
func makeCgroup(path string) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		dir := h
		for _, elem := range strings.Split(strings.Trim(path, "/"), "/") {
			parent := dir
			dir = filepath.Join(dir, elem)
			if err := os.Mkdir(dir, 0o755); errors.Is(err, fs.ErrExist) {
				continue
			} else if err != nil {
				return fmt.Errorf("make cgroup %s: %w", dir, err)
			}
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(parent, f))
				if err != nil {
					continue // not the cpuset hierarchy
				}
				if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
					return fmt.Errorf("make cgroup %s: %s: %w", dir, f, err)
				}
			}
		}
	}
	return nil
}

// joinCgroup makes cgroup path and moves process pid (0: the caller) into
// it in every hierarchy.
func joinCgroup(path string, pid int) error {
	if err := makeCgroup(path); err != nil {
		return err
	}
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		if err := os.WriteFile(filepath.Join(h, path, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
			return fmt.Errorf("move process %d into cgroup %s: %w", pid, filepath.Join(h, path), err)
		}
	}
	return nil
}

// cgroupPids returns the processes in cgroup path and below, in any
// hierarchy, but this one.
func cgroupPids(path string) ([]int, error) {
	hs, err := hierarchies()
	if err != nil {
		return nil, err
	}
	seen := map[int]bool{}
	var pids []int
	for _, h := range hs {
		err := filepath.WalkDir(filepath.Join(h, path), func(p string, d fs.DirEntry, err error) error {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if err != nil || !d.IsDir() {
				return err
			}
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if err != nil {
				return err
			}
			for _, line := range strings.Fields(string(b)) {
				pid, err := strconv.Atoi(line)
				if err == nil && pid != os.Getpid() && !seen[pid] {
					seen[pid] = true
					pids = append(pids, pid)
				}
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("processes in cgroup %s: %w", path, err)
		}
	}
	return pids, nil
}

// killCgroup kills every process in cgroup path and below (but this one)
// with SIGKILL, and waits until none is left.
func killCgroup(path string) error {
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		pids, err := cgroupPids(path)
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v still in cgroup %s 30 s after SIGKILL", pids, path)
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		<-tick.C
	}
}

// removeCgroup kills what is left in cgroup path and removes it, and the
// cgroups below it, from every hierarchy.
func removeCgroup(path string) error {
	if err := killCgroup(path); err != nil {
		return err
	}
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		var dirs []string
		filepath.WalkDir(filepath.Join(h, path), func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		// Deepest first: a cgroup goes only once its children have.
		for _, d := range slices.Backward(dirs) {
			if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
			}
		}
	}
	return errors.Join(errs...)
}

// unmountUnder unmounts everything mounted at or below dir, deepest first:
// the kubelet's volumes, containerd's container roots and the pods'
// network namespaces, which outlive the programs that made them.
func unmountUnder(dir string) error {
	if dir == "" {
		return nil
	}
	for range 10 {
		f, err := os.Open("/proc/self/mountinfo")
		if err != nil {
			return err
		}
		var points []string
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 5 {
				continue
			}
			if mp := unescapeMount(fields[4]); mp == dir || strings.HasPrefix(mp, dir+"/") {
				points = append(points, mp)
			}
		}
		f.Close()
		if len(points) == 0 {
			return nil
		}
		slices.SortFunc(points, func(a, b string) int { return len(b) - len(a) })
		for _, mp := range points {
			unix.Unmount(mp, unix.MNT_DETACH)
		}
	}
	return fmt.Errorf("mounts left under %s after 10 rounds of unmounting", dir)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// pauseImage builds ./pause, the pod sandbox, into binDir and returns its
// image.
func pauseImage(ctx context.Context, binDir string) (Image, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return Image{}, err
	}
	bin := filepath.Join(binDir, "pause")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./internal/kubecluster/pause")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return Image{}, fmt.Errorf("build the pause image: %w\n%s", err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return Image{}, err
	}
	return Image{
		Ref:        pauseRef,
		Files:      []ImageFile{{Path: "/pause", Mode: 0o755, Data: data}},
		User:       "65535:65535",
		Entrypoint: []string{"/pause"},
	}, nil
}

// moduleRoot returns the directory of the go.mod that governs the working
// directory.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find module root with go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find module root: not inside a Go module (GOMOD=%q)", gomod)
	}
	return filepath.Dir(gomod), nil
}

// ModuleRoot returns the root of the module the working directory is in:
// the checkout whose manifests and image the test runs.
func ModuleRoot(ctx context.Context) (string, error) { return moduleRoot(ctx) }
