// Package bench measures tsrelay against its baselines on a loopback
// tailnet: the data path between two laptops (direct UDP, DERP only, the
// tsrelay peer relay, a stock tailscaled configured as a peer relay by
// hand), readiness time, memory and binary size. cmd/bench runs it for
// `make bench` and `make bench-smoke`; see README.md.
//
// Everything runs on 127.0.0.1 with Tailscale's test control, DERP and STUN
// servers in this process (internal/tailnettest), and every tailscaled and
// relay runs with log uploads, port mapping and Tailscale's control off.
package bench

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"tailscale.com/types/logger"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// Config says what to run.
type Config struct {
	// Smoke runs a seconds-long subset: the tsrelay path, tsrelay
	// readiness and sizes, with a 1 s transfer and 3 pings.
	Smoke bool
	// BinDir is where the relay, tailscaled and tailscale are built (kept
	// between runs so that go build can skip an up-to-date link).
	BinDir string
	// WorkDir holds the nodes' state and logs; empty means a new
	// temporary directory, removed at the end.
	WorkDir string
	// Transfer is how long each throughput run sends; Pings how many disco
	// pings each RTT figure is made of. Zero means the mode's default.
	Transfer time.Duration
	Pings    int
	// Rounds is how many times each throughput transfer and each readiness
	// measurement runs; the report shows the median. Zero means 3 (1 with
	// Smoke).
	Rounds int
	// Logf receives progress; nil discards it.
	Logf logger.Logf
}

func (c *Config) defaults() {
	if c.Logf == nil {
		c.Logf = logger.Discard
	}
	if c.BinDir == "" {
		c.BinDir = filepath.Join(os.TempDir(), "tsrelay-bench-bin")
	}
	if c.Transfer == 0 {
		c.Transfer = 5 * time.Second
		if c.Smoke {
			c.Transfer = time.Second
		}
	}
	if c.Rounds == 0 {
		c.Rounds = 3
		if c.Smoke {
			c.Rounds = 1
		}
	}
	if c.Pings == 0 {
		c.Pings = 100
		if c.Smoke {
			c.Pings = 3
		}
	}
}

// Path scenarios.
const (
	scDirect = "direct UDP"
	scDERP   = "DERP only"
	scRelay  = "tsrelay peer relay"
	scStock  = "stock tailscaled peer relay"
)

// Run runs the benchmark. It returns the report even when a scenario
// failed (its error is in Report.Errors, and Run returns them joined), so
// that what was measured is not lost.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.defaults()
	start := time.Now()
	rep := newReport(cfg)
	logf := cfg.Logf

	work := cfg.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "tsrelay-bench-")
		if err != nil {
			return rep, err
		}
		defer os.RemoveAll(d)
		work = d
	}

	logf("building relay, tailscaled and tailscale into %s", cfg.BinDir)
	bctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	bins, err := tailnettest.Build(bctx, cfg.BinDir)
	cancel()
	if err != nil {
		return rep, err
	}

	var errs []error
	fail := func(scenario string, err error) {
		logf("%s: FAILED: %v", scenario, err)
		rep.Errors = append(rep.Errors, scenario+": "+err.Error())
		errs = append(errs, fmt.Errorf("%s: %w", scenario, err))
	}

	paths := []string{scDirect, scDERP, scRelay, scStock}
	if cfg.Smoke {
		paths = []string{scRelay}
	}
	res := map[string]*pathResult{}
	for _, sc := range paths {
		if ctx.Err() != nil {
			break
		}
		logf("path: %s", sc)
		r, err := runPath(ctx, cfg, bins, filepath.Join(work, "path-"+strconv.Itoa(len(res))), sc)
		if err != nil {
			fail(sc, err)
			continue
		}
		logf("path: %s: %.1f Mbit/s, RTT p50 %.3f ms p99 %.3f ms via %s", sc, r.Mbps, r.P50, r.P99, r.Via)
		res[sc] = r
	}
	rep.addPaths(res)

	if ctx.Err() == nil {
		var rounds []readiness
		for i := range cfg.Rounds {
			logf("readiness, round %d of %d", i+1, cfg.Rounds)
			rd, err := runReadiness(ctx, cfg, bins, filepath.Join(work, "ready-"+strconv.Itoa(i)))
			if err != nil {
				fail("readiness", err)
				break
			}
			logf("readiness: tsrelay new %.3f s, restart %.3f s; stock new %.3f s, restart %.3f s", rd.RelayNew, rd.RelayRestart, rd.StockNew, rd.StockRestart)
			rounds = append(rounds, rd)
		}
		if len(rounds) > 0 {
			rep.addReadiness(medianReadiness(rounds), len(rounds))
		}
	}

	if err := rep.addSizes(bins); err != nil {
		fail("sizes", err)
	}
	if err := ctx.Err(); err != nil {
		errs = append(errs, context.Cause(ctx))
	}
	rep.Seconds = time.Since(start).Seconds()
	rep.Machine.LoadEnd = loadAvg()
	return rep, errors.Join(errs...)
}

// pathResult is what one path scenario measured.
type pathResult struct {
	Via      string  // the path the pongs took, e.g. peer-relay(127.0.0.1:41000:vni:1)
	Mbps     float64 // TCP goodput a → b, median of MbpsRuns
	MbpsRuns []float64
	P50, P99 float64 // disco ping RTT, ms
	Pongs    int     // pongs over the wanted path (of Config.Pings)
	// Relay footprint, for the two relay scenarios (KiB).
	RelayIdleKiB, RelayLoadKiB int64
}

// closers runs cleanup functions in reverse order.
type closers []func()

func (c *closers) add(f func()) { *c = append(*c, f) }
func (c *closers) run() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
}

// runPath builds a fresh tailnet (control, DERP, STUN; a relay for the relay
// scenarios; laptops a and b), checks that a reaches b over the scenario's
// path, and measures ping RTT and TCP throughput.
func runPath(ctx context.Context, cfg Config, bins tailnettest.Binaries, dir, sc string) (_ *pathResult, err error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var cl closers
	defer cl.run()

	control, err := tailnettest.StartControl(nil)
	if err != nil {
		return nil, err
	}
	cl.add(control.Close)

	res := &pathResult{}
	want := pathRelay
	relayPid := 0
	switch sc {
	case scDirect:
		want = pathDirect
	case scDERP:
		want = pathDERP
	case scRelay:
		port, err := tailnettest.FreeUDPPort()
		if err != nil {
			return nil, err
		}
		r, err := startTSRelay(ctx, bins, filepath.Join(dir, "relay"), control, port, true)
		if err != nil {
			return nil, err
		}
		cl.add(func() { r.Close() })
		if err := waitReadyz(ctx, r); err != nil {
			return nil, fmt.Errorf("tsrelay: %w\n%s", err, r.LogTail(20))
		}
		relayPid = r.Pid()
	case scStock:
		n, err := startStockRelay(ctx, bins, filepath.Join(dir, "relay"), control)
		if err != nil {
			return nil, err
		}
		cl.add(func() { n.close() })
		relayPid = n.proc.Pid()
	}
	if relayPid != 0 {
		// Idle: ready, settled, before any laptop joins.
		time.Sleep(settle(cfg))
		if res.RelayIdleKiB, err = rssKiB(relayPid); err != nil {
			return nil, err
		}
	}

	neverDirect := sc != scDirect
	a, err := startNode(ctx, bins, filepath.Join(dir, "a"), "a", neverDirect)
	if err != nil {
		return nil, err
	}
	cl.add(func() { a.close() })
	b, err := startNode(ctx, bins, filepath.Join(dir, "b"), "b", neverDirect)
	if err != nil {
		return nil, err
	}
	cl.add(func() { b.close() })
	if _, err := a.up(ctx, control); err != nil {
		return nil, err
	}
	ipB, err := b.up(ctx, control)
	if err != nil {
		return nil, err
	}
	if err := a.waitPeer(ctx, ipB); err != nil {
		return nil, fmt.Errorf("a never saw b: %w", err)
	}
	pctx, pcancel := context.WithTimeout(ctx, 45*time.Second)
	res.Via, err = waitPath(pctx, a, ipB, want)
	pcancel()
	if err != nil {
		return nil, err
	}

	rtts, other, err := pingRTT(ctx, a, ipB, cfg.Pings, want)
	if err != nil {
		return nil, err
	}
	if other > 0 {
		cfg.Logf("%s: %d of %d pongs came over another path; left out", sc, other, cfg.Pings)
	}
	res.Pongs = len(rtts)
	res.P50, res.P99 = percentile(rtts, 50), percentile(rtts, 99)

	var s *rssSampler
	if relayPid != 0 {
		s = sampleRSS(relayPid)
	}
	if !cfg.Smoke {
		// Warm-up, not counted: early transfers on a fresh pair of nodes
		// tend to be the slowest (seen: 290 vs 430-560 Mbit/s).
		if _, err := throughput(ctx, a, ipB, time.Second); err != nil {
			s.Stop()
			return nil, fmt.Errorf("warm-up transfer: %w", err)
		}
	}
	for range cfg.Rounds {
		mbps, err := throughput(ctx, a, ipB, cfg.Transfer)
		if err != nil {
			s.Stop()
			return nil, fmt.Errorf("throughput: %w", err)
		}
		res.MbpsRuns = append(res.MbpsRuns, mbps)
	}
	res.RelayLoadKiB = s.Stop()
	res.Mbps = percentile(res.MbpsRuns, 50)
	// The data must have taken the same path as the pings.
	vctx, vcancel := context.WithTimeout(ctx, 10*time.Second)
	after, err := waitPath(vctx, a, ipB, want)
	vcancel()
	if err != nil {
		return nil, fmt.Errorf("after the transfer: %w", err)
	}
	if after != res.Via {
		cfg.Logf("%s: path changed during the run: %s → %s", sc, res.Via, after)
	}
	return res, nil
}

func settle(cfg Config) time.Duration {
	if cfg.Smoke {
		return 500 * time.Millisecond
	}
	return 2 * time.Second
}

// startTSRelay starts the relay binary with its state in dir, listening for
// relay traffic on port and advertising 127.0.0.1:port.
func startTSRelay(ctx context.Context, bins tailnettest.Binaries, dir string, c *tailnettest.Control, port int, withKey bool) (*tailnettest.Relay, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	env := []string{
		"TS_CONTROL_URL=" + c.URL,
		"TS_STATE_DIR=" + filepath.Join(dir, "state"),
		"TS_HOSTNAME=relay",
		"TS_RELAY_SERVER_PORT=" + strconv.Itoa(port),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS=127.0.0.1:" + strconv.Itoa(port),
	}
	if withKey {
		env = append(env, "TS_AUTHKEY="+c.AuthKey)
	}
	return tailnettest.StartRelay(ctx, bins, "relay", filepath.Join(dir, "relay.log"), env...)
}

// waitReadyz polls the relay's /readyz every 10 ms until it answers 200.
func waitReadyz(ctx context.Context, r *tailnettest.Relay) error {
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return tailnettest.WaitFor(wctx, 10*time.Millisecond, func() (bool, error) {
		select {
		case <-r.Done():
			return false, fmt.Errorf("relay exited: %v", r.Wait(wctx))
		default:
		}
		code, _, err := r.Get(wctx, "/readyz")
		return err == nil && code == http.StatusOK, nil
	})
}

// startStockRelay is the baseline: a stock tailscaled (the same version)
// made a peer relay by hand, the way its documentation says: `tailscale up`,
// then `tailscale set --relay-server-port=… --relay-server-static-endpoints=…`.
// It returns once the relay socket is bound.
func startStockRelay(ctx context.Context, bins tailnettest.Binaries, dir string, c *tailnettest.Control) (*node, error) {
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		return nil, err
	}
	n, err := startNode(ctx, bins, dir, "stock-relay", false)
	if err != nil {
		return nil, err
	}
	if err := stockRelayUp(ctx, n, c, port); err != nil {
		n.close()
		return nil, err
	}
	return n, nil
}

func stockRelayUp(ctx context.Context, n *node, c *tailnettest.Control, port int) error {
	if _, err := n.up(ctx, c); err != nil {
		return err
	}
	p := strconv.Itoa(port)
	if err := n.cli(ctx, "set", "--relay-server-port="+p, "--relay-server-static-endpoints=127.0.0.1:"+p); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := n.waitRelayBound(wctx); err != nil {
		return fmt.Errorf("stock relay socket never bound: %w", err)
	}
	return nil
}

// readiness is what the readiness scenario measured, in seconds; a
// negative value was not measured.
type readiness struct {
	RelayNew, RelayRestart float64
	StockNew, StockRestart float64
}

// medianReadiness is the per-field median of rounds (negative: not measured).
func medianReadiness(rounds []readiness) readiness {
	med := func(f func(readiness) float64) float64 {
		var xs []float64
		for _, r := range rounds {
			xs = append(xs, f(r))
		}
		return percentile(xs, 50)
	}
	return readiness{
		RelayNew:     med(func(r readiness) float64 { return r.RelayNew }),
		RelayRestart: med(func(r readiness) float64 { return r.RelayRestart }),
		StockNew:     med(func(r readiness) float64 { return r.StockNew }),
		StockRestart: med(func(r readiness) float64 { return r.StockRestart }),
	}
}

// runReadiness times, on a fresh tailnet: tsrelay from process start to
// /readyz 200 with a new identity and again from the saved state; the stock
// tailscaled from process start through `tailscale up` and `tailscale set
// --relay-server-port` to a bound relay socket, and again from its saved
// state (which keeps the relay prefs) to a bound socket.
func runReadiness(ctx context.Context, cfg Config, bins tailnettest.Binaries, dir string) (readiness, error) {
	rd := readiness{-1, -1, -1, -1}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	control, err := tailnettest.StartControl(nil)
	if err != nil {
		return rd, err
	}
	defer control.Close()

	relayPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		return rd, err
	}
	stockPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		return rd, err
	}

	// tsrelay, new identity.
	t0 := time.Now()
	r, err := startTSRelay(ctx, bins, filepath.Join(dir, "relay"), control, relayPort, true)
	if err != nil {
		return rd, err
	}
	if err := waitReadyz(ctx, r); err != nil {
		r.Close()
		return rd, fmt.Errorf("tsrelay (new): %w\n%s", err, r.LogTail(20))
	}
	rd.RelayNew = time.Since(t0).Seconds()
	if err := r.Close(); err != nil {
		return rd, fmt.Errorf("stop tsrelay: %w", err)
	}

	// Stock tailscaled, new identity.
	if !cfg.Smoke {
		t0 = time.Now()
		n, err := startNode(ctx, bins, filepath.Join(dir, "stock"), "stock-relay", false)
		if err != nil {
			return rd, err
		}
		if err := stockRelayUp(ctx, n, control, stockPort); err != nil {
			n.close()
			return rd, err
		}
		rd.StockNew = time.Since(t0).Seconds()
		if err := n.close(); err != nil {
			return rd, fmt.Errorf("stop stock relay: %w", err)
		}
	}

	// Restarts from saved state, with no auth key: testcontrol checks the
	// key on every register request, unlike Tailscale's control.
	control.AllowRegisterWithoutKey()
	t0 = time.Now()
	r, err = startTSRelay(ctx, bins, filepath.Join(dir, "relay"), control, relayPort, false)
	if err != nil {
		return rd, err
	}
	err = waitReadyz(ctx, r)
	rd.RelayRestart = time.Since(t0).Seconds()
	r.Close()
	if err != nil {
		return rd, fmt.Errorf("tsrelay (restart): %w", err)
	}

	if !cfg.Smoke {
		t0 = time.Now()
		n, err := startNode(ctx, bins, filepath.Join(dir, "stock"), "stock-relay", false)
		if err != nil {
			return rd, err
		}
		defer n.close()
		if _, err := n.waitRunning(ctx); err != nil {
			return rd, err
		}
		wctx, wcancel := context.WithTimeout(ctx, time.Minute)
		err = n.waitRelayBound(wctx)
		wcancel()
		if err != nil {
			return rd, fmt.Errorf("stock relay (restart): %w", err)
		}
		rd.StockRestart = time.Since(t0).Seconds()
	}
	return rd, nil
}

// binSize is the size of a file in bytes.
func binSize(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}
