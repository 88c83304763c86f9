// Command bench runs tsrelay's benchmark (make bench, make bench-smoke) and
// writes its results as Markdown and JSON. See bench/README.md.
//
// It builds what it runs, then runs itself again in new network and mount
// namespaces (bench.RunIsolated), where the benchmark creates its hosts;
// nothing it creates outlives that copy.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tsrelay/tsrelay/bench"
)

func main() {
	cfg, out, err := parseFlags()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(2)
	}
	// Ctrl-C or SIGTERM cancels the run; Run's deferred cleanup then stops
	// every process it started (which also die with this one: Pdeathsig).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log.SetFlags(log.Ltime | log.Lmicroseconds)

	if !bench.Isolated() {
		err := buildAndIsolate(ctx, cfg)
		if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
			os.Exit(ee.ExitCode())
		} else if err != nil {
			log.Fatalf("bench: %v", err)
		}
		return
	}
	if err := run(ctx, cfg, out); err != nil {
		log.Fatalf("bench: %v", err)
	}
}

// parseFlags reads the flags into the run's configuration and the results
// directory, and checks them, so that a mistake is reported before
// anything is built.
func parseFlags() (cfg bench.Config, out string, err error) {
	smoke := flag.Bool("smoke", false, "run the seconds-long subset: tsrelay path with one pair and its RSS, tsrelay readiness, HTTP port abuse, one failover trial (two relays), sizes")
	outDir := flag.String("out", "bench/results", "directory for <time>.md and <time>.json")
	binDir := flag.String("bin", filepath.Join(os.TempDir(), "tsrelay-bench-bin"), "where to build relay, tailscaled, tailscale and containerboot")
	transfer := flag.Duration("transfer", 0, "iperf3 transfer time per round, whole seconds (default 5s, 1s with -smoke)")
	pings := flag.Int("pings", 0, "ICMP pings per path (default 200, 10 with -smoke)")
	rounds := flag.Int("rounds", 0, "throughput transfers per path, readiness rounds, DERP first-pong pairs and flood transfers; the median is reported (default 3, 1 with -smoke)")
	pairs := flag.String("pairs", "", "comma-separated numbers of laptop pairs sending through a relay at once, for the memory rows; the DERP section's load uses the first (default 1,4,8; 1 with -smoke)")
	mtu := flag.Int("mtu", 0, "pod link MTU of the small-MTU row (default 1230)")
	levers := flag.String("levers", "", "semicolon-separated extra tsrelay configurations for the footprint rows, each space-separated NAME=VALUE settings (e.g. 'GOGC=50;TS_RELAY_SERVER_SOCKETS=1'), compared with the default in the same run")
	footprint := flag.Bool("footprint", false, "run only the relayed scenarios (paths and RSS through each relay variant), the HTTP port abuse and the sizes: no direct or DERP path, MTU row, DERP section, failover, readiness or DERP port abuse")
	profile := flag.String("profile", "", "save tsrelay's heap and CPU profiles in this directory (go tool pprof reads them)")
	failover := flag.Bool("failover", true, "run the failover section (one relay against two: kill -9, SIGTERM, node failure, SIGTERM after draining; the meshed DERP region losing a node)")
	failoverOnly := flag.Bool("failover-only", false, "run only the failover section (and the sizes)")
	failoverCases := flag.String("failover-cases", strings.Join(bench.FailoverCases(), ","), "comma-separated failover cases to run: kill, term, node, drain, mesh (the meshed DERP region)")
	failoverReps := flag.Int("failover-reps", 3, "trials per failover case and topology")
	failoverWindow := flag.Duration("failover-window", time.Minute, "how long a failover trial waits for pings to ride a relay again (after the drain, for drain; for mesh, to be answered again after a node failure)")
	failoverDrain := flag.Duration("failover-drain", 65*time.Second, "how long the drain case waits between the event and the SIGTERM")
	abuseOnly := flag.Bool("abuse-only", false, "run only the abuse sections: the HTTP port's, the DERP port's and the UDP junk flood (and the sizes; with -smoke only the HTTP port's)")
	abuseEnv := flag.String("abuse-env", "", "space-separated NAME=VALUE relay settings for the DERP abuse rows (e.g. 'TS_DERP_ACCEPT_RATE=100000' to see what the other limits hold)")
	work := flag.String("work", "", "keep the nodes' state and logs in this directory (default: a temporary one, removed)")
	flag.Parse()

	cfg = bench.Config{
		Smoke:    *smoke,
		BinDir:   *binDir,
		Transfer: *transfer,
		Pings:    *pings,
		Rounds:   *rounds,
		SmallMTU: *mtu,
		WorkDir:  *work,

		FootprintOnly: *footprint,

		AbuseOnly: *abuseOnly,
		AbuseEnv:  strings.Fields(*abuseEnv),

		NoFailover:     !*failover,
		FailoverOnly:   *failoverOnly,
		FailoverReps:   *failoverReps,
		FailoverWindow: *failoverWindow,
		FailoverDrain:  *failoverDrain,
	}
	if *failoverReps < 1 {
		return cfg, "", fmt.Errorf("-failover-reps: %d is not a positive number", *failoverReps)
	}
	if *failoverWindow < 10*time.Second || *failoverDrain < 0 {
		return cfg, "", fmt.Errorf("-failover-window must be at least 10s and -failover-drain not negative (got %v, %v)", *failoverWindow, *failoverDrain)
	}
	fc, err := bench.ParseFailoverCases(*failoverCases)
	if err != nil {
		return cfg, "", fmt.Errorf("-failover-cases: %w", err)
	}
	if len(fc) == 0 {
		return cfg, "", errors.New("-failover-cases: empty (want e.g. kill,term,node,drain,mesh; use -failover=false to skip the section)")
	}
	cfg.FailoverCases = fc
	for _, l := range strings.Split(*levers, ";") {
		env := strings.Fields(l)
		for _, kv := range env {
			if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
				return cfg, "", fmt.Errorf("-levers: %q is not NAME=VALUE (want e.g. 'GOGC=50;TS_RELAY_SERVER_SOCKETS=1')", kv)
			}
		}
		if len(env) > 0 {
			cfg.Levers = append(cfg.Levers, env)
		}
	}
	cfg.ProfileDir = *profile
	for _, f := range strings.FieldsFunc(*pairs, func(r rune) bool { return r == ',' }) {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return cfg, "", fmt.Errorf("-pairs: %q is not a positive number (want e.g. 1,4,8)", f)
		}
		cfg.Pairs = append(cfg.Pairs, n)
	}
	return cfg, *outDir, nil
}

// buildAndIsolate builds what the bench runs, then runs this program again
// in new network and mount namespaces, with the same arguments.
func buildAndIsolate(ctx context.Context, cfg bench.Config) error {
	if err := bench.CheckHost(); err != nil {
		return err
	}
	start := time.Now()
	log.Printf("building relay, tailscaled and tailscale into %s", cfg.BinDir)
	if err := bench.Build(ctx, cfg.BinDir, !cfg.Smoke && !cfg.FailoverOnly && !cfg.AbuseOnly, log.Printf); err != nil {
		return fmt.Errorf("build: %w", err)
	}
	log.Printf("built in %v; running in new network namespaces", time.Since(start).Round(100*time.Millisecond))
	return bench.RunIsolated(ctx, os.Args[1:], os.Stdout, os.Stderr)
}

// run runs the benchmark in the isolated copy and writes its results to
// out, even when a section failed.
func run(ctx context.Context, cfg bench.Config, out string) error {
	cfg.Logf = log.Printf
	if cfg.ProfileDir != "" {
		if err := os.MkdirAll(cfg.ProfileDir, 0o755); err != nil {
			return fmt.Errorf("-profile: %w", err)
		}
	}
	rep, err := bench.Run(ctx, cfg)
	if rep != nil && len(rep.Rows) > 0 {
		rep.WriteMarkdown(os.Stdout)
		md, js, werr := rep.WriteFiles(out)
		if werr != nil {
			log.Printf("write results: %v", werr)
		} else {
			fmt.Printf("\nwrote %s and %s\n", md, js)
		}
	}
	return err
}
