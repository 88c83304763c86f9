package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// execWithoutSocketFilters names, in the environment of this test binary
// run as a wrapper, the program it executes with socket filters refused
// (see TestMain).
const execWithoutSocketFilters = "TSRELAY_TEST_EXEC_WITHOUT_SOCKET_FILTERS"

// TestMain runs the tests, unless this binary was started as the wrapper
// of TestRelayWithoutSocketFilters: then it refuses SO_ATTACH_FILTER to
// itself with a seccomp filter, as a sandbox that does not offer socket
// filters would, and executes the relay, which inherits the refusal.
func TestMain(m *testing.M) {
	if target := os.Getenv(execWithoutSocketFilters); target != "" {
		if err := refuseSocketFilters(); err != nil {
			fmt.Fprintf(os.Stderr, "refuse socket filters: %v\n", err)
			os.Exit(2)
		}
		err := syscall.Exec(target, []string{target}, os.Environ())
		fmt.Fprintf(os.Stderr, "exec %s: %v\n", target, err)
		os.Exit(2)
	}
	os.Exit(m.Run())
}

// refuseSocketFilters installs a seccomp filter on every thread of this
// process (and so on what it executes) under which setsockopt(SOL_SOCKET,
// SO_ATTACH_FILTER) fails with EPERM; every other system call is allowed.
func refuseSocketFilters() error {
	arch, ok := map[string]uint32{"amd64": unix.AUDIT_ARCH_X86_64, "arm64": unix.AUDIT_ARCH_AARCH64}[runtime.GOARCH]
	if !ok {
		return fmt.Errorf("no seccomp architecture for %s: add it here", runtime.GOARCH)
	}
	// struct seccomp_data: int nr; u32 arch; u64 instruction_pointer;
	// u64 args[6]. The low halves of args[1] (level) and args[2]
	// (optname), little-endian on both architectures.
	const (
		offNr, offArch, offLevel, offOptname = 0, 4, 16 + 8, 16 + 2*8
		allow, refuse                        = 9, 8
	)
	to := func(i, t int) uint8 { return uint8(t - i - 1) }
	insns, err := bpf.Assemble([]bpf.Instruction{
		/* 0 */ bpf.LoadAbsolute{Off: offArch, Size: 4},
		/* 1 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: arch, SkipFalse: to(1, allow)},
		/* 2 */ bpf.LoadAbsolute{Off: offNr, Size: 4},
		/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_SETSOCKOPT, SkipFalse: to(3, allow)},
		/* 4 */ bpf.LoadAbsolute{Off: offLevel, Size: 4},
		/* 5 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SOL_SOCKET, SkipFalse: to(5, allow)},
		/* 6 */ bpf.LoadAbsolute{Off: offOptname, Size: 4},
		/* 7 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SO_ATTACH_FILTER, SkipFalse: to(7, allow)},
		/* 8 */ bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
		/* 9 */ bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW},
	})
	if err != nil {
		return err
	}
	filter := make([]unix.SockFilter, len(insns))
	for i, in := range insns {
		filter[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&prog))); errno != 0 {
		return fmt.Errorf("seccomp: %w", errno)
	}
	return nil
}

// TestRelayWithoutSocketFilters runs the real relay where the kernel
// refuses socket filters (a seccomp filter, as some sandboxes have): it
// must say so once in its log, count no filter drops, and relay as before.
func TestRelayWithoutSocketFilters(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	relayPort, fwdAddr := forwardedRelayPort(t, "127.0.0.1:0")
	wrapped := bins
	wrapped.Relay = os.Args[0]
	relay := startRelay(t, wrapped, "relay", execWithoutSocketFilters+"="+bins.Relay,
		"TS_CONTROL_URL="+control.URL, "TS_AUTHKEY="+control.AuthKey, "TS_STATE_DIR="+t.TempDir(),
		"TS_HOSTNAME=relay", "TS_RELAY_SERVER_PORT="+strconv.Itoa(relayPort),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS="+fwdAddr.String())
	waitReady(t, relay)
	log := readFile(t, relay.LogPath())
	const warning = `level=WARN msg="relay sockets are not all filtered: junk sent to the relay port costs more CPU" port=`
	if !strings.Contains(log, warning+strconv.Itoa(relayPort)+" filtered=0 ") || !strings.Contains(log, "operation not permitted") {
		t.Errorf("the relay did not warn that its sockets are unfiltered (want %q… filtered=0, EPERM):\n%s", warning, log)
	}
	for line := range strings.Lines(log) {
		if strings.Contains(line, warning) {
			t.Logf("the relay's warning: %s", strings.TrimSpace(line))
		}
	}
	if strings.Contains(log, `msg="relay sockets filtered"`) {
		t.Errorf("the relay logged its sockets filtered, though the kernel refused:\n%s", log)
	}
	a, ipB := startLaptops(t, bins, control)
	pingVia(t, t.Context(), a, ipB, "via peer-relay("+fwdAddr.String()+":vni:")
}
