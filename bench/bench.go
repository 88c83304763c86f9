// Package bench measures tsrelay against its baselines: the data path
// between two laptops (direct UDP, DERP only, the tsrelay peer relay, a stock
// tailscaled configured as a peer relay by hand), readiness time, memory
// under load and binary size. cmd/bench runs it for `make bench` and `make
// bench-smoke`; see README.md.
//
// Everything runs on this machine, in network namespaces the bench creates
// inside its own (RunIsolated): laptops are kernel-TUN tailscaled processes,
// each in its own namespace on a bridge; relays run in a pod namespace
// behind a node namespace that forwards their UDP port, as a load balancer
// does; Tailscale's test control, DERP and STUN servers run in the bench
// process. iperf3 and ping measure the data path.
package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"tailscale.com/types/logger"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// Build builds what the bench runs into dir: relay, tailscaled and tailscale
// at the version go.mod pins, and with containerboot also Tailscale's
// containerboot (for the image-size comparison). Call it before
// RunIsolated: the isolated copy has no network to fetch modules with.
func Build(ctx context.Context, dir string, containerboot bool, logf logger.Logf) error {
	if _, err := tailnettest.Build(ctx, dir); err != nil {
		return err
	}
	if containerboot {
		if err := buildContainerboot(ctx, dir); err != nil {
			logf("containerboot not built, so the size comparison leaves it out: %v", err)
		}
	}
	return nil
}

// Run runs the benchmark. It must run in the copy of the program that
// RunIsolated started, with binaries Build made. It returns the report even
// when a scenario failed (its error is in Report.Errors, and Run returns
// them joined), so that what was measured is not lost.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.defaults()
	start := time.Now()
	rep := newReport(cfg)
	logf := cfg.Logf

	lab, err := newLab(ctx)
	if err != nil {
		return rep, err
	}
	bins := tailnettest.Binaries{
		Tailscaled: filepath.Join(cfg.BinDir, "tailscaled"),
		Tailscale:  filepath.Join(cfg.BinDir, "tailscale"),
		Relay:      filepath.Join(cfg.BinDir, "relay"),
	}
	work := cfg.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "tsrelay-bench-")
		if err != nil {
			return rep, err
		}
		defer os.RemoveAll(d)
		work = d
	}

	var errs []error
	fail := func(scenario string, err error) {
		logf("%s: FAILED: %v", scenario, err)
		rep.Errors = append(rep.Errors, scenario+": "+err.Error())
		errs = append(errs, fmt.Errorf("%s: %w", scenario, err))
	}
	b := &bench{cfg: cfg, lab: lab, bins: bins}

	res := map[string]*pathResult{}
	// FailoverOnly leaves out every section but failover (and sizes);
	// AbuseOnly every section but the abuse ones.
	others := !cfg.FailoverOnly && !cfg.AbuseOnly
	if others && !cfg.Smoke && !cfg.FootprintOnly && ctx.Err() == nil {
		logf("paths: %s and %s", scDirect, scDERP)
		direct, derp, err := b.runUnrelayed(ctx, filepath.Join(work, "unrelayed"))
		if err != nil {
			fail(scDirect+", "+scDERP, err)
		} else {
			res[scDirect], res[scDERP] = direct, derp
		}
	}
	// The IPv6 row comes right after the IPv4 one, so that the two are
	// measured under much the same load on the machine; it has no memory
	// rows.
	variants := cfg.variants()
	for i, v := range variants {
		if ctx.Err() != nil || !others {
			break
		}
		if v.noLoad && cfg.FootprintOnly {
			continue
		}
		logf("path: %s", v.name)
		loads := cfg.Pairs
		if v.noLoad {
			loads = nil
		}
		r, err := b.runRelayed(ctx, filepath.Join(work, "relayed-"+strconv.Itoa(i)), v, podMTU, loads)
		if err != nil {
			fail(v.name, err)
			continue
		}
		res[v.name] = r
	}
	var small *pathResult
	if others && !cfg.Smoke && !cfg.FootprintOnly && ctx.Err() == nil {
		logf("path: %s, pod link MTU %d", scRelay, cfg.SmallMTU)
		small, err = b.runRelayed(ctx, filepath.Join(work, "small-mtu"), variants[0], cfg.SmallMTU, nil)
		if err != nil {
			fail(fmt.Sprintf("%s, MTU %d", scRelay, cfg.SmallMTU), err)
		}
	}
	rep.addPaths(res)
	rep.addMTU(res[scRelay], small, cfg.SmallMTU)
	rep.addSockets(res, variants)
	rep.addLoad(res, variants, cfg.Pairs)

	if others && !cfg.Smoke && !cfg.FootprintOnly && ctx.Err() == nil {
		logf("DERP: first pongs via %s and %s; %s", scOffsiteDERP, scInClusterDERP, scRelayDERPOn)
		d, err := b.runDERP(ctx, filepath.Join(work, "derp"))
		if err != nil {
			fail("DERP", err)
		}
		rep.addDERP(d, res[scRelay])
	}

	// Failover (issue 20): losing the relay a pair rides, one relay
	// against two, and the meshed DERP region losing a node.
	if !cfg.NoFailover && !cfg.FootprintOnly && !cfg.AbuseOnly && ctx.Err() == nil {
		logf("failover: cases %s, %d trials each, one relay and two", strings.Join(cfg.FailoverCases, ","), cfg.FailoverReps)
		f, err := b.runFailover(ctx, filepath.Join(work, "failover"))
		if err != nil {
			fail("failover", err)
		}
		if f != nil {
			logf("failover: the section took %.0f s", f.Seconds)
		}
		rep.addFailover(f)
	}

	if others && !cfg.FootprintOnly && ctx.Err() == nil {
		var rounds []readiness
		for i := range cfg.Rounds {
			logf("readiness, round %d of %d", i+1, cfg.Rounds)
			rd, err := b.runReadiness(ctx, filepath.Join(work, "ready-"+strconv.Itoa(i)))
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

	if (others || cfg.AbuseOnly) && ctx.Err() == nil {
		logf("HTTP port abuse")
		ab, err := b.runHTTPAbuse(ctx, filepath.Join(work, "abuse"))
		if err != nil {
			fail("HTTP abuse", err)
		}
		rep.addAbuse(ab)
	}
	// The DERP port's abuse and the UDP flood (issue 27): not in the
	// smoke run (a minute of attacks), nor with FootprintOnly.
	if (others || cfg.AbuseOnly) && !cfg.Smoke && !cfg.FootprintOnly && ctx.Err() == nil {
		logf("DERP port abuse and UDP flood")
		da, fl, err := b.runDERPAbuse(ctx, filepath.Join(work, "derp-abuse"))
		if err != nil {
			fail("DERP abuse", err)
		}
		rep.addDERPAbuse(da, fl, cfg.AbuseEnv)
	}

	if err := rep.addSizes(bins, filepath.Join(cfg.BinDir, "containerboot")); err != nil {
		fail("sizes", err)
	}
	if err := ctx.Err(); err != nil {
		errs = append(errs, context.Cause(ctx))
	}
	rep.Seconds = time.Since(start).Seconds()
	rep.Machine.LoadEnd = loadAvg()
	return rep, errors.Join(errs...)
}

// bench is one run's setting.
type bench struct {
	cfg  Config
	lab  *lab
	bins tailnettest.Binaries
}
