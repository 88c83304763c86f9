// Package memtune sets the process-wide Go runtime settings a relay needs
// (GOMAXPROCS from the relay's socket count, GOGC, the soft memory limit from
// the container's cgroup limit) and hands the heap's free memory back to the
// OS once relayed traffic goes quiet. It knows nothing of the relay but the
// socket count it is given.
package memtune

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"time"
)

// Memory figures behind the footprint formula in the README (Resources).
const (
	// socketBufferBytes is what one relay socket's read loop holds: 128
	// receive buffers of 64 KiB (batching.IdealBatchSize messages of
	// 1<<16-1 bytes, packetReadLoop in net/udprelay/server.go, tailscale.com
	// v1.102.5). They are allocated at bind and become resident as bulk
	// traffic (UDP GRO) fills them; they stay resident while the socket is
	// open.
	socketBufferBytes = 128 << 16
	// relayFamilies is IPv4 and IPv6: the relay server binds the same
	// number of sockets for each (IPv6 only if it can).
	relayFamilies = 2
	// MaxSockets is the most sockets per family Tailscale's relay server
	// binds, whatever GOMAXPROCS is (net/udprelay, tailscale.com v1.102.5).
	MaxSockets = 16
)

// gcPercent is the relay's GOGC unless the environment sets one: the heap
// may grow by a quarter over what the last collection found live before
// the next one, instead of Go's default of doubling. What counts as live
// here is mostly buffers allocated once and never touched (wireguard-go's
// message pools, about 39 MB, and the relay sockets' 8 MiB each), so the
// default let the relay's per-batch garbage fill as much real memory
// again; the collections this costs are cheap, because those buffers hold
// no pointers to scan. Measured with make bench (8 pairs, 2 sockets):
// peak RSS 112 MiB at GOGC=100, 55 MiB at 25, 48 MiB at 10, with relayed
// throughput and CPU per GB within the run's noise.
const gcPercent = 25

// memoryLimitShare is the part of the container's memory limit given to the
// Go runtime as its soft limit (GOMEMLIMIT): the rest is for what the
// runtime does not count (the executable's pages, thread stacks, kernel
// socket buffers charged to the container) and for the time a collection
// takes to catch up.
const memoryLimitShare = 0.85

// Settings is what Apply set.
type Settings struct {
	// Sockets is how many relay sockets per IP family the relay server
	// will bind: min(16, GOMAXPROCS).
	Sockets int
	// GOMAXPROCS is the runtime's new GOMAXPROCS.
	GOMAXPROCS int
	// GCPercent is the runtime's GOGC, and GCPercentFrom "GOGC" when the
	// environment set it, "default" when Apply did.
	GCPercent     int
	GCPercentFrom string
	// MemoryLimit is the Go runtime's soft memory limit in bytes
	// (math.MaxInt64: none), and MemoryLimitFrom says where it came from:
	// "GOMEMLIMIT", "cgroup <file>" or "none".
	MemoryLimit     int64
	MemoryLimitFrom string
}

// BufferBytes is the most memory the relay sockets' receive buffers can
// hold: sockets × families × 8 MiB.
func (r Settings) BufferBytes() int64 {
	return int64(r.Sockets) * relayFamilies * socketBufferBytes
}

// LogValue implements slog.LogValuer: one start-up line with the socket
// count and what it costs.
func (r Settings) LogValue() slog.Value {
	limit := "none"
	if r.MemoryLimit != math.MaxInt64 {
		limit = fmt.Sprintf("%dMiB", r.MemoryLimit>>20)
	}
	return slog.GroupValue(
		slog.Int("socketsPerFamily", r.Sockets),
		slog.Int("gomaxprocs", r.GOMAXPROCS),
		slog.String("socketBuffersMax", fmt.Sprintf("%dMiB", r.BufferBytes()>>20)),
		slog.Int("gogc", r.GCPercent),
		slog.String("gogcFrom", r.GCPercentFrom),
		slog.String("goMemoryLimit", limit),
		slog.String("goMemoryLimitFrom", r.MemoryLimitFrom),
	)
}

// Apply sets the process-wide runtime settings for a relay that binds
// sockets relay sockets per IP family. Call it once, in main, before
// anything starts: Tailscale's relay server reads GOMAXPROCS when it binds
// its sockets.
//
// GOMAXPROCS becomes sockets (TS_RELAY_SERVER_SOCKETS) (overriding the GOMAXPROCS
// variable and Go's CPU-limit-based default), because the relay server binds
// min(16, GOMAXPROCS) sockets per family and each can hold 8 MiB: without
// this, the footprint would follow the node's core count. The relay's data
// path is one goroutine per socket, mostly in recvmmsg and sendmmsg, so the
// same number of Ps is what it can use.
//
// Unless GOGC is set, the collector's target becomes gcPercent (see there
// for why and what it was measured to cost).
//
// Unless GOMEMLIMIT is set, the Go runtime's soft memory limit becomes
// memoryLimitShare of the container's memory limit (cgroup v2 memory.max or
// v1 memory.limit_in_bytes), so that garbage is collected before the kernel
// kills the container rather than after.
func Apply(sockets int) Settings {
	procs := sockets
	runtime.GOMAXPROCS(procs)
	r := Settings{Sockets: min(MaxSockets, procs), GOMAXPROCS: procs, MemoryLimit: math.MaxInt64, MemoryLimitFrom: "none"}
	if os.Getenv("GOGC") != "" {
		r.GCPercent = debug.SetGCPercent(-1)
		debug.SetGCPercent(r.GCPercent)
		r.GCPercentFrom = "GOGC"
	} else {
		debug.SetGCPercent(gcPercent)
		r.GCPercent, r.GCPercentFrom = gcPercent, "default"
	}
	if os.Getenv("GOMEMLIMIT") != "" {
		r.MemoryLimit, r.MemoryLimitFrom = debug.SetMemoryLimit(-1), "GOMEMLIMIT"
		return r
	}
	if limit, file, ok := cgroupMemoryLimit(); ok {
		r.MemoryLimit = int64(float64(limit) * memoryLimitShare)
		r.MemoryLimitFrom = "cgroup " + file
		debug.SetMemoryLimit(r.MemoryLimit)
	}
	return r
}

// cgroupMemoryLimit returns this process's container memory limit in
// bytes and the file it was read from; ok is false when there is none.
// Under cgroup v2 (what current Kubernetes nodes run) a container sees its
// own cgroup at /sys/fs/cgroup; under v1, its memory controller at
// /sys/fs/cgroup/memory.
func cgroupMemoryLimit() (limit int64, file string, ok bool) {
	for _, f := range []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if v, ok := parseCgroupLimit(string(b)); ok {
			return v, f, true
		}
		return 0, "", false
	}
	return 0, "", false
}

// parseCgroupLimit reads a cgroup memory limit: "max" (v2) or a byte count;
// v1 reports "no limit" as a huge number (the page-rounded maximum), which
// is treated as none.
func parseCgroupLimit(s string) (int64, bool) {
	s = strings.TrimSpace(s)
	if s == "max" {
		return 0, false
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v <= 0 || v >= 1<<62 {
		return 0, false
	}
	return v, true
}

// ReturnMemoryConfig is how ReturnFreeMemory decides.
type ReturnMemoryConfig struct {
	// Interval is how often it looks.
	Interval time.Duration
	// QuietAllocBytes: a process that allocated less than this in the last
	// interval is idle (no traffic).
	QuietAllocBytes uint64
	// MinFreeBytes: return memory only if at least this much of the heap
	// the OS has given is not live (garbage, or free but not returned).
	MinFreeBytes uint64
}

// DefaultReturnMemory looks every 5 s, calls the process idle below 1 MiB
// allocated in that time (bulk relaying allocates far more: a batch slice
// per destination per read), and returns memory once 4 MiB or more of the
// heap is garbage or free.
func DefaultReturnMemory() ReturnMemoryConfig {
	return ReturnMemoryConfig{Interval: 5 * time.Second, QuietAllocBytes: 1 << 20, MinFreeBytes: 4 << 20}
}

// ReturnFreeMemory returns the Go heap's free memory to the OS once the
// process goes quiet after traffic, until ctx ends. After a burst of relayed
// traffic the heap holds the garbage the burst made; Go's background
// scavenger gives it back only slowly, after the next collection (forced
// every 2 minutes when nothing allocates), so the pod would sit above its
// request long after the traffic stopped. The relay sockets' receive
// buffers are live and stay; the rest goes at once.
func ReturnFreeMemory(ctx context.Context, cfg ReturnMemoryConfig, logger *slog.Logger) error {
	samples := []metrics.Sample{
		{Name: "/gc/heap/allocs:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
		{Name: "/gc/heap/live:bytes"},
	}
	metrics.Read(samples)
	last := samples[0].Value.Uint64()
	t := time.NewTicker(cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if errors.Is(context.Cause(ctx), context.Canceled) {
				return nil
			}
			return context.Cause(ctx)
		case <-t.C:
		}
		metrics.Read(samples)
		allocs := samples[0].Value.Uint64()
		held := samples[1].Value.Uint64() + samples[2].Value.Uint64()
		notLive := held - min(held, samples[3].Value.Uint64())
		quiet := allocs-last < cfg.QuietAllocBytes
		last = allocs
		if !quiet || notLive < cfg.MinFreeBytes {
			continue
		}
		debug.FreeOSMemory()
		logger.Debug("returned the heap's garbage and free memory to the OS", "MiB", notLive>>20)
	}
}
