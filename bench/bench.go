// Package bench measures tsrelay against its baselines, in one run, and
// reports each figure beside its baseline's from the same run. cmd/bench
// runs it for `make bench` and `make bench-smoke`; see README.md.
//
// Run's sections (sections.go), in the order they run:
//
//   - paths: the data path between two laptops (ping RTT, iperf3
//     throughput) directly over UDP, over DERP only, and through each relay
//     variant: tsrelay over IPv4 and over IPv6, the stock tailscaled
//     configured as a peer relay by hand, both sized for a 16-core node,
//     and tsrelay with each Config.Levers setting. Their report sections:
//     paths, sockets (throughput by relay socket count) and footprint (the
//     relays' RSS idle, under k pairs at once and after the load);
//   - MTU: tsrelay behind a pod link of Config.SmallMTU;
//   - DERP: the first pong via an off-site and via tsrelay's in-cluster DERP
//     region, and tsrelay's RSS and CPU with its DERP server on;
//   - failover: the five cases of failover.go (CaseKill, CaseTerm,
//     CaseNode, CaseDrain with one relay and with two; CaseMesh, the meshed
//     DERP region losing a node);
//   - readiness: tsrelay's and the stock relay's start, new and from state;
//   - HTTP abuse: unfinished request headers held at tsrelay's HTTP port;
//   - DERP abuse: strangers at the DERP port, admitted clients' cost, and a
//     junk flood at the relay's UDP port and STUN;
//   - sizes: the stripped relay binary against what the tailscale/tailscale
//     image carries.
//
// Config's flags choose the sections (Config.Smoke, FootprintOnly,
// FailoverOnly, AbuseOnly, NoFailover); each section's "when" says which.
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

// Run runs the benchmark: every section whose "runs when" holds for cfg
// (see sections), in order, until ctx is done; then the rows of every such
// section, the sizes' included, so that a cancelled run has them. It must
// run in the copy of the program that RunIsolated started, with binaries
// Build made. It returns the report even when a section failed (its error
// is in Report.Errors, and Run returns them joined), so that what was
// measured is not lost.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.defaults()
	start := time.Now()
	r := &runner{rep: newReport(cfg), paths: map[string]*pathResult{}, variants: cfg.variants()}
	lab, err := newLab(ctx)
	if err != nil {
		return r.rep, err
	}
	r.bench = &bench{cfg: cfg, lab: lab, bins: tailnettest.Binaries{
		Tailscaled: filepath.Join(cfg.BinDir, "tailscaled"),
		Tailscale:  filepath.Join(cfg.BinDir, "tailscale"),
		Relay:      filepath.Join(cfg.BinDir, "relay"),
	}}
	r.work = cfg.WorkDir
	if r.work == "" {
		d, err := os.MkdirTemp("", "tsrelay-bench-")
		if err != nil {
			return r.rep, err
		}
		defer os.RemoveAll(d)
		r.work = d
	}

	secs := sections()
	for _, s := range secs {
		if ctx.Err() != nil {
			break
		}
		if s.run == nil || !s.when(&cfg) {
			continue
		}
		if err := s.run(r, ctx); err != nil {
			r.fail(s.name, err)
		}
	}
	// The rows come after every measurement, in the table's order: the
	// paths rows compare scenarios from three sections, and a section cut
	// short by ctx still reports what it measured.
	for _, s := range secs {
		if s.when(&cfg) {
			s.rows(r)
		}
	}
	if err := ctx.Err(); err != nil {
		r.errs = append(r.errs, context.Cause(ctx))
	}
	r.rep.Seconds = time.Since(start).Seconds()
	r.rep.Machine.LoadEnd = loadAvg()
	return r.rep, errors.Join(r.errs...)
}

// runner is one Run in progress: the bench, the directory its nodes keep
// their state in, the report, and what the sections measured, kept for
// their rows.
type runner struct {
	*bench
	work string
	rep  *Report
	errs []error

	variants  []variant
	paths     map[string]*pathResult // by scenario
	small     *pathResult            // tsrelay behind a pod link of Config.SmallMTU
	derp      *derpResult
	failover  *failoverResult
	ready     []readiness // one per round
	httpAbuse []abuseResult
	derpAbuse []derpAbuseResult
	flood     *udpFloodResult
}

// fail records that scenario failed: in the log, the report's errors and
// Run's error.
func (r *runner) fail(scenario string, err error) {
	r.cfg.Logf("%s: FAILED: %v", scenario, err)
	r.rep.Errors = append(r.rep.Errors, scenario+": "+err.Error())
	r.errs = append(r.errs, fmt.Errorf("%s: %w", scenario, err))
}

// bench is one run's setting.
type bench struct {
	cfg  Config
	lab  *lab
	bins tailnettest.Binaries
}
