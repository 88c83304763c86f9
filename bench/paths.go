package bench

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tsrelay/tsrelay/internal/udpsock"
)

// pathResult is what one path scenario measured.
type pathResult struct {
	Via      string  // the path the pongs took, e.g. peer-relay(10.88.0.3:40000:vni:1)
	Mbps     float64 // iperf3 TCP goodput a → b, median of MbpsRuns
	MbpsRuns []float64
	P50, P99 float64 // ICMP ping RTT, ms
	Pongs    int     // replies (of Config.Pings)
	// For the relay scenarios: the relay's RSS when ready with no peers,
	// and its peak while k pairs send through it at once (KiB).
	RelayIdleKiB int64
	RelayIdle    map[string]int64 // its /proc status figures then (KiB)
	Load         map[int]load
	// RelayAfter is its /proc status figures (KiB) afterSettle after the
	// last load ended: what it keeps once traffic stops.
	RelayAfter   map[string]int64
	AfterSeconds float64 // how long after the load RelayAfter was read
	// Sockets is how many UDP sockets the relay had bound on its port.
	Sockets udpsock.Counts
	// MTUWarning is tsrelay's tsrelay_path_mtu_too_small gauge after the
	// transfers (-1: not exported).
	MTUWarning float64
	// Forwarded is tsrelay's tailscaled_peer_relay_forwarded_packets_total
	// after the transfers, by "transport_in→transport_out" (e.g.
	// "udp6→udp6"); nil for the stock relay.
	Forwarded map[string]float64
}

// runUnrelayed measures the direct and the DERP-only path, on one tailnet
// with no relay: pair d may use direct UDP, pair n may not.
func (b *bench) runUnrelayed(ctx context.Context, dir string) (direct, derp *pathResult, err error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	tn, err := b.newTailnet(dir)
	if err != nil {
		return nil, nil, err
	}
	defer tn.close()
	d, err := tn.pair(ctx, "d", true)
	if err != nil {
		return nil, nil, err
	}
	n, err := tn.pair(ctx, "n", false)
	if err != nil {
		return nil, nil, err
	}
	if direct, err = b.measurePath(ctx, scDirect, d, pathDirect); err != nil {
		return nil, nil, err
	}
	if derp, err = b.measurePath(ctx, scDERP, n, pathDERP); err != nil {
		return nil, nil, err
	}
	return direct, derp, nil
}

// errPathLost is measureOnce's error when the pair was off its path after
// the transfers.
var errPathLost = errors.New("path lost during the transfers")

// measurePath checks that p.a reaches p.b over want, and measures ping RTT
// and iperf3 throughput; then checks the path again. On 2 shared cores a
// pair sometimes loses the relay path under a transfer and falls back to
// DERP until its next relay-path discovery (up to 30 s), which would count
// DERP's throughput as the relay's: such a measurement is made again, once.
func (b *bench) measurePath(ctx context.Context, sc string, p *pair, want pathKind) (*pathResult, error) {
	res, err := b.measureOnce(ctx, sc, p, want)
	if errors.Is(err, errPathLost) {
		b.cfg.Logf("%s: %v; measuring again", sc, err)
		res, err = b.measureOnce(ctx, sc, p, want)
	}
	return res, err
}

// measureOnce is one measurePath attempt.
func (b *bench) measureOnce(ctx context.Context, sc string, p *pair, want pathKind) (*pathResult, error) {
	res := &pathResult{}
	pctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	via, err := waitPath(pctx, p.a, p.ipB, want)
	cancel()
	if err != nil {
		return nil, err
	}
	res.Via = via
	rtts, err := pingRTT(ctx, p.nsA, p.ipB, b.cfg.Pings)
	if err != nil {
		return nil, err
	}
	res.Pongs = len(rtts)
	res.P50, res.P99 = percentile(rtts, 50), percentile(rtts, 99)
	if !b.cfg.Smoke {
		// Warm-up, not counted: the first transfer on a new path is the
		// slowest (WireGuard handshakes, path discovery).
		if _, err := throughput(ctx, p.nsA, p.ipB, time.Second); err != nil {
			return nil, fmt.Errorf("warm-up transfer: %w", err)
		}
	}
	for range b.cfg.Rounds {
		mbps, err := throughput(ctx, p.nsA, p.ipB, b.cfg.Transfer)
		if err != nil {
			return nil, err
		}
		res.MbpsRuns = append(res.MbpsRuns, mbps)
	}
	res.Mbps = percentile(res.MbpsRuns, 50)
	// The data must have taken the same path as the pings.
	vctx, vcancel := context.WithTimeout(ctx, 10*time.Second)
	after, err := waitPath(vctx, p.a, p.ipB, want)
	vcancel()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errPathLost, err)
	}
	if after != res.Via {
		b.cfg.Logf("%s: path changed during the run: %s → %s", sc, res.Via, after)
	}
	b.cfg.Logf("%s: %.0f Mbit/s %s, RTT p50 %.3f ms p99 %.3f ms, via %s", sc, res.Mbps, fmtRuns(res.MbpsRuns), res.P50, res.P99, res.Via)
	return res, nil
}
