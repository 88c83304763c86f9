package bench

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/internal/udpsock"
)

// load is what one "k pairs at once" run measured.
type load struct {
	PeakKiB int64
	Mbps    float64 // the pairs' goodput, summed
	// CPUPerGB is the relay's CPU time (user + system) per gigabyte the
	// pairs received.
	CPUPerGB float64
}

// runRelayed starts the relay v (tsrelay or the stock baseline) in a pod
// with the given link MTU, records its idle RSS, measures the path of one
// pair through it, then its peak RSS while each count in loads of pairs
// sends through it at once, and what it still holds afterSettle later.
// With v.ipv6 the peers reach the relay over IPv6 only, and the path must
// show its IPv6 load-balancer address.
func (b *bench) runRelayed(ctx context.Context, dir string, v variant, mtu int, loads []int) (*pathResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	tn, err := b.newTailnet(dir)
	if err != nil {
		return nil, err
	}
	defer tn.close()
	tn.ipv6 = v.ipv6
	p, err := tn.pod(ctx, "relay", mtu)
	if err != nil {
		return nil, err
	}
	rl, err := tn.startVariant(ctx, p, filepath.Join(dir, "relay"), v)
	if err != nil {
		return nil, err
	}
	prof := func(name, path string) {
		b.profile(ctx, rl.ts, fmt.Sprintf("%s-mtu%d-%s", filepath.Base(dir), mtu, name), path)
	}
	// Idle: ready, settled, before any laptop joins.
	time.Sleep(b.settle())
	idle, err := procStatus(rl.pid)
	if err != nil {
		return nil, err
	}
	prof("idle.heap", "/debug/pprof/heap")

	n := 1
	for _, k := range loads {
		n = max(n, k)
	}
	b.cfg.Logf("%s: starting %d laptop pairs", v.name, n)
	pairs, err := tn.pairs(ctx, n)
	if err != nil {
		return nil, err
	}
	res, err := b.measurePath(ctx, v.name, pairs[0], pathRelay)
	if err != nil {
		return nil, err
	}
	if want := "peer-relay(" + p.LB.String() + ":vni:"; v.ipv6 && !strings.HasPrefix(res.Via, want) {
		return nil, fmt.Errorf("relayed path went via %s, want %s…): not the relay's IPv6 address", res.Via, want)
	}
	res.RelayIdleKiB, res.RelayIdle = idle["VmRSS"], idle
	res.MTUWarning, res.Forwarded = relayCounters(ctx, rl.ts)
	if v.ipv6 && res.Forwarded["udp6→udp6"] == 0 {
		return nil, fmt.Errorf("tsrelay forwarded no packets from udp6 to udp6 (%v)", res.Forwarded)
	}

	if res.Load, err = b.loadRuns(ctx, v.name, rl, pairs, loads, prof); err != nil {
		return nil, err
	}
	prof("loaded.heap", "/debug/pprof/heap")
	if len(loads) > 0 {
		if res.RelayAfter, err = b.afterLoad(ctx, v.name, rl.pid); err != nil {
			return nil, err
		}
		res.AfterSeconds = b.afterSettle().Seconds()
	}
	// How many sockets the relay bound on its port: what its buffers scale
	// with.
	if res.Sockets, err = udpsock.Count(rl.pid, relayPort); err != nil {
		return nil, err
	}
	return res, nil
}

// runningRelay is a relay variant started in its pod: its process, and
// tsrelay's handle (nil for the stock relay, which has no HTTP port).
type runningRelay struct {
	pid int
	ts  *tailnettest.Relay
}

// startVariant starts the relay v in p, and returns once it is ready (its
// relay socket bound); tn.close stops it.
func (tn *tailnet) startVariant(ctx context.Context, p pod, dir string, v variant) (runningRelay, error) {
	if v.stock {
		l, err := tn.startStock(ctx, p, dir, true, v.env...)
		if err != nil {
			return runningRelay{}, err
		}
		tn.cleanup(func() { l.Close() })
		return runningRelay{pid: l.Pid()}, nil
	}
	ts, err := tn.startTSRelay(ctx, p, dir, true, v.env...)
	if err != nil {
		return runningRelay{}, err
	}
	tn.cleanup(func() { ts.Close() })
	if err := waitReadyz(ctx, ts); err != nil {
		return runningRelay{}, err
	}
	return runningRelay{pid: ts.Pid(), ts: ts}, nil
}

// relayCounters reads tsrelay's tsrelay_path_mtu_too_small gauge (-1: not
// exported, or the stock relay) and its forwarded-packet counters by
// "transport_in→transport_out" (nil for the stock relay).
func relayCounters(ctx context.Context, ts *tailnettest.Relay) (mtuWarning float64, forwarded map[string]float64) {
	if ts == nil {
		return -1, nil
	}
	fams, err := ts.Metrics(ctx)
	if err != nil {
		return -1, nil
	}
	mtuWarning = -1
	if v, ok := tailnettest.MetricSum(fams, "tsrelay_path_mtu_too_small"); ok {
		mtuWarning = v
	}
	forwarded = map[string]float64{}
	for _, in := range []string{"udp4", "udp6"} {
		for _, out := range []string{"udp4", "udp6"} {
			v, _ := tailnettest.MetricSum(fams, "tailscaled_peer_relay_forwarded_packets_total", "transport_in", in, "transport_out", out)
			forwarded[in+"→"+out] = v
		}
	}
	return mtuWarning, forwarded
}

// loadRuns has each count in loads of pairs send through the relay at once
// (loadRelay), profiling tsrelay's CPU meanwhile when asked to.
func (b *bench) loadRuns(ctx context.Context, sc string, rl runningRelay, pairs []*pair, loads []int, prof func(name, path string)) (map[int]load, error) {
	res := map[int]load{}
	for _, k := range loads {
		var g errgroup.Group
		g.Go(func() error {
			secs := int(b.loadTransfer().Seconds())
			prof(fmt.Sprintf("%dpairs.cpu", k), "/debug/pprof/profile?seconds="+strconv.Itoa(secs))
			return nil
		})
		l, err := b.loadRelay(ctx, rl.pid, pairs[:k])
		g.Wait()
		if err != nil {
			return nil, fmt.Errorf("%d pairs at once: %w", k, err)
		}
		b.cfg.Logf("%s: %d pairs at once: %.0f Mbit/s in all, relay RSS peak %.1f MiB", sc, k, l.Mbps, float64(l.PeakKiB)/1024)
		res[k] = l
	}
	return res, nil
}

// afterLoad reads what the relay keeps once the traffic has stopped,
// afterSettle after the last load. The laptops stay up, idle, as a user's
// would.
func (b *bench) afterLoad(ctx context.Context, sc string, pid int) (map[string]int64, error) {
	select {
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	case <-time.After(b.afterSettle()):
	}
	after, err := procStatus(pid)
	if err != nil {
		return nil, err
	}
	b.cfg.Logf("%s: %v after the load: RSS %.1f MiB (%s)", sc, b.afterSettle(), float64(after["VmRSS"])/1024, rssParts(after))
	return after, nil
}

// profile saves tsrelay's profile at path to Config.ProfileDir/name, when
// profiling and r is tsrelay. A failure is logged, not fatal.
func (b *bench) profile(ctx context.Context, r *tailnettest.Relay, name, path string) {
	if b.cfg.ProfileDir == "" || r == nil {
		return
	}
	code, body, err := r.Get(ctx, path)
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("HTTP %d", code)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(b.cfg.ProfileDir, "tsrelay-"+name), []byte(body), 0o644)
	}
	if err != nil {
		b.cfg.Logf("profile %s: %v", name, err)
	}
}

// loadRelay has every pair send through the relay at once (after checking
// that each pair's path is the relay) and samples the relay's RSS.
func (b *bench) loadRelay(ctx context.Context, pid int, pairs []*pair) (load, error) {
	g, gctx := errgroup.WithContext(ctx)
	for _, p := range pairs {
		g.Go(func() error {
			wctx, cancel := context.WithTimeout(gctx, 45*time.Second)
			defer cancel()
			_, err := waitPath(wctx, p.a, p.ipB, pathRelay)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return load{}, err
	}
	s := sampleRSS(pid)
	cpu0, err := cpuSeconds(pid)
	if err != nil {
		s.Stop()
		return load{}, err
	}
	mbps := make([]float64, len(pairs))
	g, gctx = errgroup.WithContext(ctx)
	for i, p := range pairs {
		g.Go(func() (err error) {
			mbps[i], err = throughput(gctx, p.nsA, p.ipB, b.loadTransfer())
			return err
		})
	}
	err = g.Wait()
	l := load{PeakKiB: s.Stop()}
	for _, m := range mbps {
		l.Mbps += m
	}
	if cpu1, cerr := cpuSeconds(pid); cerr == nil && l.Mbps > 0 {
		gb := l.Mbps * b.loadTransfer().Seconds() / 8 / 1000
		l.CPUPerGB = (cpu1 - cpu0) / gb
	}
	return l, err
}

func (b *bench) settle() time.Duration {
	if b.cfg.Smoke {
		return 500 * time.Millisecond
	}
	return 2 * time.Second
}

// afterSettle is how long after the last load the relay's RSS is read
// again: long enough for tsrelay's ReturnFreeMemory (which looks every 5 s
// and wants one whole quiet interval) to act.
func (b *bench) afterSettle() time.Duration {
	if b.cfg.Smoke {
		return time.Second
	}
	return 15 * time.Second
}

func (b *bench) loadTransfer() time.Duration {
	if b.cfg.Smoke {
		return time.Second
	}
	return 3 * time.Second
}
