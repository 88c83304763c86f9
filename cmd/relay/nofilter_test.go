package main

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
	"tailscale.com/tailcfg"

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

// TestRelayWithoutSocketFilters runs the real relay, its DERP region on,
// where the kernel refuses socket filters (a seccomp filter, as some
// sandboxes have): it must say so once in its log for the relay port and
// for STUN, never claim its sockets filtered, and be ready and relay as
// before.
func TestRelayWithoutSocketFilters(t *testing.T) {
	bins := binaries(t)
	ports := freeDERPRelayPorts(t)
	stateDir := t.TempDir()
	region, _ := pinnedRegion(t, stateDir, ports)
	control, err := tailnettest.StartControlWith(netip.MustParseAddr("127.0.0.1"), t.Logf, tailnettest.ControlOptions{Regions: []*tailcfg.DERPRegion{region}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(control.Close)
	wrapped := bins
	wrapped.Relay = os.Args[0]
	relay := startRelay(t, wrapped, "relay", append(ports.env(), execWithoutSocketFilters+"="+bins.Relay,
		"TS_CONTROL_URL="+control.URL, "TS_AUTHKEY="+control.AuthKey, "TS_STATE_DIR="+stateDir, "TS_HOSTNAME=relay")...)
	waitReady(t, relay)
	log := readFile(t, relay.LogPath())
	for _, want := range []string{
		`level=WARN msg="relay sockets are not all filtered: junk sent to the relay port costs more CPU" port=` + strconv.Itoa(ports.relay) + " filtered=0 ",
		`level=WARN msg="STUN serves unfiltered: junk sent to it costs more CPU"`,
	} {
		found := false
		for line := range strings.Lines(log) {
			if strings.Contains(line, want) {
				found = true
				t.Logf("the relay warned: %s", strings.TrimSpace(line))
				if !strings.Contains(line, "operation not permitted") {
					t.Errorf("the warning does not give the kernel's refusal (EPERM): %s", line)
				}
			}
		}
		if !found {
			t.Errorf("the relay did not warn %q:\n%s", want, log)
		}
	}
	if strings.Contains(log, `msg="relay sockets filtered"`) {
		t.Errorf("the relay logged its sockets filtered, though the kernel refused:\n%s", log)
	}
	a, ipB := startLaptops(t, bins, control)
	// Any of the relay's addresses (it also offers the ones it finds
	// itself, such as this machine's interface address), at its port.
	pingVia(t, t.Context(), a, ipB, ":"+strconv.Itoa(ports.relay)+":vni:")
}
