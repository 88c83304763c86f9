package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// section is one part of a run: when it runs, what it measures and the rows
// it adds from that.
type section struct {
	// name labels the section's errors in the log and the report.
	name string
	// when says whether the section is in a run with this configuration
	// (the Config methods in config.go).
	when func(*Config) bool
	// run measures and keeps the results in the runner; nil for a section
	// that only adds rows.
	run func(*runner, context.Context) error
	// rows adds the section's rows from what run kept. Run calls it for
	// every section that is in the run, even one that failed or never
	// started because ctx ended, so each rows method adds only what was
	// measured.
	rows func(*runner)
}

// sections are the parts of a run, in the order they run. The three path
// sections share one rows method: the paths rows compare scenarios across
// them.
func sections() []section {
	return []section{
		{name: scDirect + ", " + scDERP, when: (*Config).full, run: (*runner).measureUnrelayed, rows: noRows},
		{name: "relayed paths", when: (*Config).unlimited, run: (*runner).measureRelayed, rows: (*runner).pathRows},
		{name: "small pod MTU", when: (*Config).full, run: (*runner).measureSmallMTU, rows: noRows},
		{name: "DERP", when: (*Config).full, run: (*runner).measureDERP, rows: (*runner).derpRows},
		{name: "failover", when: (*Config).failover, run: (*runner).measureFailover, rows: (*runner).failoverRows},
		{name: "readiness", when: (*Config).notFootprint, run: (*runner).measureReadiness, rows: (*runner).readinessRows},
		{name: "HTTP abuse", when: (*Config).abuse, run: (*runner).measureHTTPAbuse, rows: (*runner).httpAbuseRows},
		{name: "DERP abuse", when: (*Config).fullAbuse, run: (*runner).measureDERPAbuse, rows: (*runner).derpAbuseRows},
		// The sizes are read with the rows, so that even a cancelled run
		// has them.
		{name: "sizes", when: (*Config).always, rows: (*runner).sizeRows},
	}
}

func noRows(*runner) {}

// measureUnrelayed measures the direct and the DERP-only path.
func (r *runner) measureUnrelayed(ctx context.Context) error {
	r.cfg.Logf("paths: %s and %s", scDirect, scDERP)
	direct, derp, err := r.runUnrelayed(ctx, filepath.Join(r.work, "unrelayed"))
	if err != nil {
		return err
	}
	r.paths[scDirect], r.paths[scDERP] = direct, derp
	return nil
}

// measureRelayed measures the path through each relay variant and, but for
// the IPv6 one, its memory under load. A variant that fails is reported and
// the next one runs. The IPv6 variant comes right after the IPv4 one, so
// that the two are measured under much the same load on the machine.
func (r *runner) measureRelayed(ctx context.Context) error {
	for i, v := range r.variants {
		if ctx.Err() != nil {
			break
		}
		if v.noLoad && r.cfg.FootprintOnly {
			continue
		}
		r.cfg.Logf("path: %s", v.name)
		loads := r.cfg.Pairs
		if v.noLoad {
			loads = nil
		}
		res, err := r.runRelayed(ctx, filepath.Join(r.work, "relayed-"+strconv.Itoa(i)), v, podMTU, loads)
		if err != nil {
			r.fail(v.name, err)
			continue
		}
		r.paths[v.name] = res
	}
	return nil
}

// measureSmallMTU measures the path through tsrelay behind a pod link of
// Config.SmallMTU.
func (r *runner) measureSmallMTU(ctx context.Context) error {
	r.cfg.Logf("path: %s, pod link MTU %d", scRelay, r.cfg.SmallMTU)
	small, err := r.runRelayed(ctx, filepath.Join(r.work, "small-mtu"), r.variants[0], r.cfg.SmallMTU, nil)
	if err != nil {
		return fmt.Errorf("pod link MTU %d: %w", r.cfg.SmallMTU, err)
	}
	r.small = small
	return nil
}

// pathRows adds the rows of the three path sections: paths, MTU, relay
// sockets and the relays' footprint.
func (r *runner) pathRows() {
	r.rep.addPaths(r.paths)
	r.rep.addMTU(r.paths[scRelay], r.small, r.cfg.SmallMTU)
	r.rep.addSockets(r.paths, r.variants)
	r.rep.addLoad(r.paths, r.variants, r.cfg.Pairs)
}

// measureDERP measures first pongs via an off-site and the in-cluster DERP
// region, and tsrelay with its DERP server on.
func (r *runner) measureDERP(ctx context.Context) error {
	r.cfg.Logf("DERP: first pongs via %s and %s; %s", scOffsiteDERP, scInClusterDERP, scRelayDERPOn)
	var err error
	r.derp, err = r.runDERP(ctx, filepath.Join(r.work, "derp"))
	return err
}

func (r *runner) derpRows() { r.rep.addDERP(r.derp, r.paths[scRelay]) }

// measureFailover runs the failover cases (issue 20): losing the relay a
// pair rides, one relay against two, and the meshed DERP region losing a
// node.
func (r *runner) measureFailover(ctx context.Context) error {
	r.cfg.Logf("failover: cases %s, %d trials each, one relay and two", strings.Join(r.cfg.FailoverCases, ","), r.cfg.FailoverReps)
	var err error
	r.failover, err = r.runFailover(ctx, filepath.Join(r.work, "failover"))
	if r.failover != nil {
		r.cfg.Logf("failover: the section took %.0f s", r.failover.Seconds)
	}
	return err
}

func (r *runner) failoverRows() { r.rep.addFailover(r.failover) }

// measureReadiness times the relays' start, Config.Rounds times.
func (r *runner) measureReadiness(ctx context.Context) error {
	for i := range r.cfg.Rounds {
		r.cfg.Logf("readiness, round %d of %d", i+1, r.cfg.Rounds)
		rd, err := r.runReadiness(ctx, filepath.Join(r.work, "ready-"+strconv.Itoa(i)))
		if err != nil {
			return err
		}
		r.cfg.Logf("readiness: tsrelay new %.3f s, restart %.3f s; stock new %.3f s, restart %.3f s", rd.RelayNew, rd.RelayRestart, rd.StockNew, rd.StockRestart)
		r.ready = append(r.ready, rd)
	}
	return nil
}

func (r *runner) readinessRows() {
	if len(r.ready) > 0 {
		r.rep.addReadiness(medianReadiness(r.ready), len(r.ready))
	}
}

// measureHTTPAbuse holds unfinished request headers open at the relay's
// HTTP port (issue 17).
func (r *runner) measureHTTPAbuse(ctx context.Context) error {
	r.cfg.Logf("HTTP port abuse")
	var err error
	r.httpAbuse, err = r.runHTTPAbuse(ctx, filepath.Join(r.work, "abuse"))
	return err
}

func (r *runner) httpAbuseRows() { r.rep.addAbuse(r.httpAbuse) }

// measureDERPAbuse attacks the DERP port and floods the relay's UDP port
// and STUN with junk (issue 27): a minute of attacks, so not in the smoke
// run.
func (r *runner) measureDERPAbuse(ctx context.Context) error {
	r.cfg.Logf("DERP port abuse and UDP flood")
	var err error
	r.derpAbuse, r.flood, err = r.runDERPAbuse(ctx, filepath.Join(r.work, "derp-abuse"))
	return err
}

func (r *runner) derpAbuseRows() { r.rep.addDERPAbuse(r.derpAbuse, r.flood, r.cfg.AbuseEnv) }

// sizeRows compares the relay binary with what the tailscale/tailscale
// image carries.
func (r *runner) sizeRows() {
	if err := r.rep.addSizes(r.bins, filepath.Join(r.cfg.BinDir, "containerboot")); err != nil {
		r.fail("sizes", err)
	}
}
