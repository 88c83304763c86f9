// Command relay is tsrelay: a Tailscale peer relay for Kubernetes in one
// static binary. It is configured only through its environment; run
// `relay --help` for the variables.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/tsrelay/tsrelay/internal/memtune"
	"github.com/tsrelay/tsrelay/relay"
	"github.com/tsrelay/tsrelay/relaycheck"
)

// version is stamped at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is main without the exit, so that exit codes are easy to read:
// 0 after a clean shutdown, 1 when the relay fails, 2 for bad usage or
// configuration (nothing was contacted).
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "-h", "-help", "--help", "help":
			usage(stdout)
			return 0
		case "-version", "--version", "version":
			fmt.Fprintln(stdout, "tsrelay", version)
			return 0
		case "check":
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return relaycheck.Main(ctx, args[1:], stdout, stderr)
		case "derpmap":
			return derpmapMain(context.Background(), args[1:], stdout, stderr)
		default:
			fmt.Fprintf(stderr, "relay: unknown argument %q; the relay is configured through its environment\n\n", args[0])
			usage(stderr)
			return 2
		}
	}
	cfg, err := relay.LoadConfig()
	if err != nil {
		for line := range strings.SplitSeq(err.Error(), "\n") {
			fmt.Fprintln(stderr, "relay: "+line)
		}
		fmt.Fprintln(stderr, "relay: see `relay --help` for every setting")
		return 2
	}
	cfg.Version = version
	// Before anything starts: the relay server sizes itself by GOMAXPROCS.
	rt := memtune.Apply(int(cfg.RelayServerSockets))
	logger := cfg.NewLogger(stderr)
	logger.Info("tsrelay", "version", version, "go", runtime.Version())
	logger.Info("relay sockets", "runtime", rt)
	// client-go logs through klog (a watch that ended with an error, say);
	// send that to the same log, structured like the rest.
	klog.SetSlogLogger(logger.With("src", "client-go"))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := relay.Run(ctx, cfg, logger); err != nil {
		logger.Error("relay failed", "err", err)
		return 1
	}
	return 0
}

func usage(w io.Writer) {
	fmt.Fprintf(w, `tsrelay %s: a Tailscale peer relay for Kubernetes.

Usage: relay [--help | --version]
       relay check [flags] <peer>...   on a laptop: does traffic to <peer> ride
                                       a peer relay? (relay check --help)
       relay derpmap [--format=headscale]  in the relay's pod: the derpMap of
                                       its DERP region, for the policy file

The relay joins your tailnet as a userspace node (no TUN, no privileges),
turns on Tailscale's peer relay on TS_RELAY_SERVER_PORT, and serves
/healthz, /readyz and /metrics on TS_LOCAL_ADDR_PORT. Peers use it only where the
tailnet policy grants "tailscale.com/cap/relay" to them for this node.

Environment:
`, version)
	relay.PrintUsage(w)
}
