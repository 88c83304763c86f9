package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"time"
)

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

// runReadiness times, on a fresh tailnet and in pods: tsrelay from process
// start to /readyz 200 with a new identity and again from the saved state;
// the stock tailscaled from process start through `tailscale up` and
// `tailscale set --relay-server-port` to a bound relay socket, and again
// from its saved state (which keeps the relay prefs) to a bound socket.
func (b *bench) runReadiness(ctx context.Context, dir string) (readiness, error) {
	rd := readiness{-1, -1, -1, -1}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	tn, err := b.newTailnet(dir)
	if err != nil {
		return rd, err
	}
	defer tn.close()
	rp, err := tn.pod(ctx, "relay", podMTU)
	if err != nil {
		return rd, err
	}

	// tsrelay, new identity.
	t0 := time.Now()
	r, err := tn.startTSRelay(ctx, rp, filepath.Join(dir, "relay"), true)
	if err != nil {
		return rd, err
	}
	if err := waitReadyz(ctx, r); err != nil {
		r.Close()
		return rd, err
	}
	rd.RelayNew = time.Since(t0).Seconds()
	if err := r.Close(); err != nil {
		return rd, fmt.Errorf("stop tsrelay: %w", err)
	}

	var sp pod
	if !b.cfg.Smoke {
		if sp, err = tn.pod(ctx, "stock", podMTU); err != nil {
			return rd, err
		}
		t0 = time.Now()
		n, err := tn.startStock(ctx, sp, filepath.Join(dir, "stock"), true)
		if err != nil {
			return rd, err
		}
		rd.StockNew = time.Since(t0).Seconds()
		if err := n.Close(); err != nil {
			return rd, fmt.Errorf("stop stock relay: %w", err)
		}
	}

	// Restarts from saved state, with no auth key: testcontrol checks the
	// key on every register request, unlike Tailscale's control.
	tn.control.AllowRegisterWithoutKey()
	t0 = time.Now()
	r, err = tn.startTSRelay(ctx, rp, filepath.Join(dir, "relay"), false)
	if err != nil {
		return rd, err
	}
	err = waitReadyz(ctx, r)
	rd.RelayRestart = time.Since(t0).Seconds()
	r.Close()
	if err != nil {
		return rd, fmt.Errorf("restart: %w", err)
	}

	if !b.cfg.Smoke {
		t0 = time.Now()
		n, err := tn.startStock(ctx, sp, filepath.Join(dir, "stock"), false)
		if err != nil {
			return rd, fmt.Errorf("restart: %w", err)
		}
		rd.StockRestart = time.Since(t0).Seconds()
		n.Close()
	}
	return rd, nil
}

// addReadiness adds the readiness rows: tsrelay's against the stock
// relay's, new and from state (a negative figure was not measured).
func (r *Report) addReadiness(rd readiness, rounds int) {
	const stock = "stock tailscaled relay"
	note := fmt.Sprintf("median of %d", rounds)
	if rd.RelayNew >= 0 {
		r.add(Row{Section: "readiness", Scenario: "tsrelay", Metric: "start → /readyz 200, new identity", Unit: "s", Value: rd.RelayNew, Better: "lower", Note: note},
			stock, rd.StockNew, rd.StockNew >= 0)
	}
	if rd.RelayRestart >= 0 {
		r.add(Row{Section: "readiness", Scenario: "tsrelay", Metric: "start → /readyz 200, existing state", Unit: "s", Value: rd.RelayRestart, Better: "lower", Note: note},
			stock, rd.StockRestart, rd.StockRestart >= 0)
	}
	if rd.StockNew >= 0 {
		r.add(Row{Section: "readiness", Scenario: stock, Metric: "start → up → set --relay-server-port → socket bound", Unit: "s", Value: rd.StockNew, Better: "lower", Note: note}, "", 0, false)
	}
	if rd.StockRestart >= 0 {
		r.add(Row{Section: "readiness", Scenario: stock, Metric: "start from state → socket bound", Unit: "s", Value: rd.StockRestart, Better: "lower", Note: note}, "", 0, false)
	}
}
