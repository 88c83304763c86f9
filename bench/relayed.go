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
	sc, ipv6 := v.name, v.ipv6
	ctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	tn, err := b.newTailnet(dir)
	if err != nil {
		return nil, err
	}
	defer tn.close()
	tn.ipv6 = ipv6
	p, err := tn.pod(ctx, "relay", mtu)
	if err != nil {
		return nil, err
	}
	var pid int
	var ts *tailnettest.Relay
	if v.stock {
		l, err := tn.startStock(ctx, p, filepath.Join(dir, "relay"), true, v.env...)
		if err != nil {
			return nil, err
		}
		tn.cleanup(func() { l.Close() })
		pid = l.Pid()
	} else {
		if ts, err = tn.startTSRelay(ctx, p, filepath.Join(dir, "relay"), true, v.env...); err != nil {
			return nil, err
		}
		tn.cleanup(func() { ts.Close() })
		if err := waitReadyz(ctx, ts); err != nil {
			return nil, err
		}
		pid = ts.Pid()
	}
	// Idle: ready, settled, before any laptop joins.
	time.Sleep(b.settle())
	idle, err := procStatus(pid)
	if err != nil {
		return nil, err
	}
	b.profile(ctx, ts, fmt.Sprintf("%s-mtu%d-idle.heap", filepath.Base(dir), mtu), "/debug/pprof/heap")

	n := 1
	for _, k := range loads {
		n = max(n, k)
	}
	b.cfg.Logf("%s: starting %d laptop pairs", sc, n)
	pairs, err := tn.pairs(ctx, n)
	if err != nil {
		return nil, err
	}
	res, err := b.measurePath(ctx, sc, pairs[0], pathRelay)
	if err != nil {
		return nil, err
	}
	if want := "peer-relay(" + p.LB.String() + ":vni:"; ipv6 && !strings.HasPrefix(res.Via, want) {
		return nil, fmt.Errorf("relayed path went via %s, want %s…): not the relay's IPv6 address", res.Via, want)
	}
	res.RelayIdleKiB, res.RelayIdle = idle["VmRSS"], idle
	res.MTUWarning = -1
	if ts != nil {
		if fams, err := ts.Metrics(ctx); err == nil {
			if v, ok := tailnettest.MetricSum(fams, "tsrelay_path_mtu_too_small"); ok {
				res.MTUWarning = v
			}
			res.Forwarded = map[string]float64{}
			for _, in := range []string{"udp4", "udp6"} {
				for _, out := range []string{"udp4", "udp6"} {
					v, _ := tailnettest.MetricSum(fams, "tailscaled_peer_relay_forwarded_packets_total", "transport_in", in, "transport_out", out)
					res.Forwarded[in+"→"+out] = v
				}
			}
		}
	}
	if ipv6 && res.Forwarded["udp6→udp6"] == 0 {
		return nil, fmt.Errorf("tsrelay forwarded no packets from udp6 to udp6 (%v)", res.Forwarded)
	}

	res.Load = map[int]load{}
	for _, k := range loads {
		var g errgroup.Group
		g.Go(func() error {
			secs := int(b.loadTransfer().Seconds())
			b.profile(ctx, ts, fmt.Sprintf("%s-mtu%d-%dpairs.cpu", filepath.Base(dir), mtu, k), "/debug/pprof/profile?seconds="+strconv.Itoa(secs))
			return nil
		})
		l, err := b.loadRelay(ctx, pid, pairs[:k])
		g.Wait()
		if err != nil {
			return nil, fmt.Errorf("%d pairs at once: %w", k, err)
		}
		b.cfg.Logf("%s: %d pairs at once: %.0f Mbit/s in all, relay RSS peak %.1f MiB", sc, k, l.Mbps, float64(l.PeakKiB)/1024)
		res.Load[k] = l
	}
	b.profile(ctx, ts, fmt.Sprintf("%s-mtu%d-loaded.heap", filepath.Base(dir), mtu), "/debug/pprof/heap")
	if len(loads) > 0 {
		// What the relay keeps once the traffic has stopped. The laptops
		// stay up, idle, as a user's would.
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-time.After(b.afterSettle()):
		}
		if res.RelayAfter, err = procStatus(pid); err != nil {
			return nil, err
		}
		res.AfterSeconds = b.afterSettle().Seconds()
		b.cfg.Logf("%s: %v after the load: RSS %.1f MiB (%s)", sc, b.afterSettle(), float64(res.RelayAfter["VmRSS"])/1024, rssParts(res.RelayAfter))
	}
	// How many sockets the relay bound on its port: what its buffers scale
	// with.
	if res.Sockets, err = udpsock.Count(pid, relayPort); err != nil {
		return nil, err
	}
	return res, nil
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
