// Command bench runs tsrelay's benchmark (make bench, make bench-smoke) and
// writes its results as Markdown and JSON. See bench/README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/tsrelay/tsrelay/bench"
)

func main() {
	smoke := flag.Bool("smoke", false, "run the seconds-long subset (tsrelay path, tsrelay readiness, sizes)")
	out := flag.String("out", "bench/results", "directory for <time>.md and <time>.json")
	binDir := flag.String("bin", "", "where to build relay, tailscaled and tailscale (default $TMPDIR/tsrelay-bench-bin)")
	transfer := flag.Duration("transfer", 0, "TCP transfer time per path (default 5s, 1s with -smoke)")
	pings := flag.Int("pings", 0, "disco pings per path (default 100, 3 with -smoke)")
	rounds := flag.Int("rounds", 0, "throughput transfers per path and readiness rounds; the median is reported (default 3, 1 with -smoke)")
	flag.Parse()

	// Ctrl-C or SIGTERM cancels the run; Run's deferred cleanup then stops
	// every process it started (which also die with this one: Pdeathsig).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	log.SetFlags(log.Ltime | log.Lmicroseconds)
	rep, err := bench.Run(ctx, bench.Config{
		Smoke:    *smoke,
		BinDir:   *binDir,
		Transfer: *transfer,
		Pings:    *pings,
		Rounds:   *rounds,
		Logf:     log.Printf,
	})
	if rep != nil && len(rep.Rows) > 0 {
		rep.WriteMarkdown(os.Stdout)
		md, js, werr := rep.WriteFiles(*out)
		if werr != nil {
			log.Printf("write results: %v", werr)
		} else {
			fmt.Printf("\nwrote %s and %s\n", md, js)
		}
	}
	if err != nil {
		log.Fatalf("bench: %v", err)
	}
}
