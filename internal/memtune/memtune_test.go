package memtune

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"testing"
	"time"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

func TestParseCgroupLimit(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"268435456\n", 256 << 20, true},
		{"max\n", 0, false},                 // cgroup v2, no limit
		{"9223372036854771712\n", 0, false}, // cgroup v1, no limit
		{"0", 0, false},
		{"lots", 0, false},
	} {
		got, ok := parseCgroupLimit(tt.in)
		if got != tt.want || ok != tt.ok {
			t.Errorf("parseCgroupLimit(%q) = %d, %v, want %d, %v", tt.in, got, ok, tt.want, tt.ok)
		}
	}
}

// TestApply checks that the socket setting becomes GOMAXPROCS (which
// Tailscale's relay server reads at bind) and that GOMEMLIMIT, when set,
// is left alone.
func TestApply(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	t.Setenv("GOGC", "")
	os.Unsetenv("GOGC")
	t.Setenv("GOMEMLIMIT", "100MiB")
	debug.SetMemoryLimit(100 << 20) // what the runtime made of it at start
	rt := Apply(3)
	if got := runtime.GOMAXPROCS(0); got != 3 || rt.GOMAXPROCS != 3 || rt.Sockets != 3 {
		t.Errorf("after Apply with 3 sockets: GOMAXPROCS = %d, Settings = %+v, want 3", got, rt)
	}
	if rt.MemoryLimit != 100<<20 || rt.MemoryLimitFrom != "GOMEMLIMIT" {
		t.Errorf("Settings memory limit = %d from %q, want %d from GOMEMLIMIT", rt.MemoryLimit, rt.MemoryLimitFrom, 100<<20)
	}
	if got := debug.SetGCPercent(100); got != gcPercent || rt.GCPercent != gcPercent || rt.GCPercentFrom != "default" {
		t.Errorf("without GOGC: GC percent = %d, Settings = %+v, want %d from default", got, rt, gcPercent)
	}

	// With GOGC set, the runtime applied it at start; Apply keeps it.
	t.Setenv("GOGC", "70")
	debug.SetGCPercent(70)
	rt = Apply(3)
	if got := debug.SetGCPercent(100); got != 70 || rt.GCPercent != 70 || rt.GCPercentFrom != "GOGC" {
		t.Errorf("with GOGC=70: GC percent = %d, Settings = %+v, want 70 from GOGC", got, rt)
	}
	if got, want := rt.BufferBytes(), int64(3*2*8<<20); got != want {
		t.Errorf("BufferBytes() = %d, want %d (3 sockets × 2 families × 8 MiB)", got, want)
	}
}

// TestReturnFreeMemory makes garbage, goes quiet, and waits for
// ReturnFreeMemory to hand the heap back to the OS: the released-heap
// figure must grow by most of the garbage. It runs in a process of its own:
// goroutines other tests leave behind (tsnet nodes shutting down, client-go
// informers) allocate enough to make the process never look quiet.
func TestReturnFreeMemory(t *testing.T) {
	if os.Getenv("TSRELAY_RETURN_MEMORY_CHILD") == "" {
		cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestReturnFreeMemory$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), "TSRELAY_RETURN_MEMORY_CHILD=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestReturnFreeMemory") {
			t.Fatalf("in a process of its own: %v\n%s", err, out)
		}
		return
	}
	read := func() (released, notLive uint64) {
		s := []metrics.Sample{
			{Name: "/memory/classes/heap/released:bytes"},
			{Name: "/memory/classes/heap/objects:bytes"},
			{Name: "/memory/classes/heap/free:bytes"},
			{Name: "/gc/heap/live:bytes"},
		}
		metrics.Read(s)
		held := s[1].Value.Uint64() + s[2].Value.Uint64()
		return s[0].Value.Uint64(), held - min(held, s[3].Value.Uint64())
	}
	defer debug.SetGCPercent(debug.SetGCPercent(-1)) // no collection but ReturnFreeMemory's
	garbage := make([][]byte, 0, 64)
	for range 64 {
		garbage = append(garbage, make([]byte, 256<<10))
	}
	for _, g := range garbage {
		g[0] = 1 // touch, so the pages are resident
	}
	garbage = nil
	before, notLive := read()
	if notLive < 8<<20 {
		t.Fatalf("only %d bytes not live after dropping 16 MiB; the test cannot see a return", notLive)
	}

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- ReturnFreeMemory(ctx, ReturnMemoryConfig{Interval: 20 * time.Millisecond, QuietAllocBytes: 1 << 20, MinFreeBytes: 4 << 20}, slog.New(slog.DiscardHandler))
	}()
	// Poll gently: a busy loop of reads allocates enough to make the
	// process never look quiet.
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	var after uint64
	if err := tailnettest.WaitFor(wctx, 10*time.Millisecond, func() (bool, error) {
		after, _ = read()
		return after-min(after, before) >= 8<<20, nil
	}); err != nil {
		t.Fatalf("released heap grew by %d bytes in 10 s, want at least 8 MiB of the 16 MiB garbage", after-min(after, before))
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("ReturnFreeMemory after cancel = %v, want nil", err)
	}
}
