package relaycheck

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"tailscale.com/client/local"
)

// Main is `relay check`: args are its flags and peers. It returns the exit
// code: 0 when every peer was reached through a peer relay (or directly,
// unless --require-relay), 1 when one was not or the check could not run,
// 2 for bad usage.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	opts, socket, asJSON, err := parseArgs(args)
	if errors.Is(err, flag.ErrHelp) {
		usage(stdout)
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "relay check: %v\n\n", err)
		usage(stderr)
		return 2
	}
	// An empty socket means the platform's default, as for the tailscale CLI.
	lc := &local.Client{Socket: socket, UseSocketOnly: socket != ""}
	rep, err := Run(ctx, lc, opts)
	if err != nil {
		fmt.Fprintf(stderr, "relay check: %v\n", err)
		return 1
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(rep)
	} else {
		err = WriteText(stdout, rep)
	}
	if err != nil {
		fmt.Fprintf(stderr, "relay check: write report: %v\n", err)
		return 1
	}
	if !rep.OK {
		return 1
	}
	return 0
}

// parseArgs parses flags and peers; flags may come after peers too.
func parseArgs(args []string) (opts Options, socket string, asJSON bool, err error) {
	fs := flag.NewFlagSet("relay check", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // Main prints the usage
	fs.StringVar(&socket, "socket", "", "")
	fs.StringVar(&opts.Relay, "relay", "", "")
	fs.BoolVar(&opts.RequireRelay, "require-relay", false, "")
	fs.BoolVar(&asJSON, "json", false, "")
	fs.DurationVar(&opts.Timeout, "timeout", 10*time.Second, "")
	fs.DurationVar(&opts.Interval, "interval", 250*time.Millisecond, "")
	fs.IntVar(&opts.Count, "count", 0, "")
	for {
		if err := fs.Parse(args); err != nil {
			return opts, "", false, err
		}
		if fs.NArg() == 0 {
			break
		}
		opts.Peers = append(opts.Peers, fs.Arg(0))
		args = fs.Args()[1:]
	}
	switch {
	case len(opts.Peers) == 0:
		return opts, "", false, errors.New("no peer to check")
	case opts.Timeout <= 0:
		return opts, "", false, fmt.Errorf("--timeout=%v: want a positive duration", opts.Timeout)
	case opts.Interval <= 0:
		return opts, "", false, fmt.Errorf("--interval=%v: want a positive duration", opts.Interval)
	case opts.Count < 0:
		return opts, "", false, fmt.Errorf("--count=%d: want 0 or more", opts.Count)
	}
	seen := map[string]bool{}
	for _, p := range opts.Peers {
		if p == "" {
			return opts, "", false, errors.New("empty peer name")
		}
		if seen[p] {
			return opts, "", false, fmt.Errorf("peer %q given twice", p)
		}
		seen[p] = true
	}
	return opts, socket, asJSON, nil
}

func usage(w io.Writer) {
	fmt.Fprint(w, `Usage: relay check [flags] <peer>...

Run on a laptop: asks this machine's tailscaled whether traffic to each
peer (hostname, MagicDNS name or tailnet IP) rides a Tailscale peer relay.
It disco-pings every peer at once, like "tailscale ping", and reports the
paths the pongs took (DERP, peer relay, direct) with their latency, which
relay carried the traffic, and, when the traffic never left DERP, why.

Exit status: 0 when every peer was reached through a peer relay (or
directly, unless --require-relay), 1 otherwise, 2 for bad usage.

Flags:
  --relay=NAME|IP:PORT  the expected relay: its node's hostname, MagicDNS name
                        or tailnet IP, or the ip:port of its relay endpoint
  --require-relay       fail peers reached directly rather than through a relay
  --json                print a JSON report (schema: the relaycheck package doc)
  --timeout=10s         bound on the whole check, all peers together
  --count=N             pings per peer (default: until the path settles off DERP)
  --interval=250ms      time between pings to one peer
  --socket=PATH         tailscaled's LocalAPI socket (default: the platform's)
`)
}

// WriteText prints rep as the human report: one block per peer.
func WriteText(w io.Writer, rep *Report) error {
	var b strings.Builder
	for _, p := range rep.Peers {
		name := cmp.Or(p.Name, p.Peer)
		if p.IP != "" && p.IP != name {
			name = fmt.Sprintf("%s (%s)", name, p.IP)
		}
		fmt.Fprintf(&b, "%s: %s\n", name, headline(p))
		if len(p.Path) > 0 {
			fmt.Fprintf(&b, "  path: %s\n", pathSequence(p.Path))
		}
		var counts string
		if p.FirstRelayedOrDirectMs != nil {
			counts = fmt.Sprintf("first relayed or direct pong after %s; ", fmtSeconds(*p.FirstRelayedOrDirectMs))
		}
		counts += fmt.Sprintf("%d pongs to %d pings", p.Pongs, p.Pings)
		if p.Timeouts > 0 {
			counts += fmt.Sprintf(", %d timed out", p.Timeouts)
		}
		fmt.Fprintf(&b, "  %s\n", counts)
		if p.Diagnosis != nil {
			fmt.Fprintf(&b, "  why: %s\n", p.Diagnosis.Message)
		}
		if p.Note != "" {
			fmt.Fprintf(&b, "  note: %s\n", p.Note)
		}
		if l := homeLine(p.Home); l != "" {
			fmt.Fprintf(&b, "  %s\n", l)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// headline is a peer's verdict in a few words: "OK via peer-relay
// 203.0.113.7:61441 vni 57 (relay, as expected)" or "FAIL: only via DERP".
func headline(p PeerReport) string {
	verdict := "OK"
	if !p.OK {
		verdict = "FAIL"
	}
	switch p.Via {
	case ViaPeerRelay:
		s := fmt.Sprintf("%s via peer-relay %s vni %d", verdict, p.Relay.Endpoint, p.Relay.VNI)
		var who []string
		if p.Relay.Name != "" {
			who = append(who, p.Relay.Name)
		} else if p.Relay.IP == "" && p.Relay.Expected == nil {
			who = append(who, "not identified")
		}
		if p.Relay.Expected != nil {
			who = append(who, map[bool]string{true: "as expected", false: "not the expected one"}[*p.Relay.Expected])
		}
		if len(who) > 0 {
			s += " (" + strings.Join(who, ", ") + ")"
		}
		return s
	case ViaDirect:
		return fmt.Sprintf("%s via direct %s", verdict, p.Path[len(p.Path)-1].Endpoint)
	case ViaDERP:
		if len(p.Path) > 1 {
			return verdict + ": back on DERP at the end"
		}
		return verdict + ": only via DERP, never through a peer relay"
	}
	if p.Error != "" {
		return verdict + ": cannot ping"
	}
	return verdict + ": no answer"
}

// fmtSeconds prints a time since the start: 12ms, 350ms, 1.2s.
func fmtSeconds(ms float64) string {
	d := time.Duration(ms * float64(time.Millisecond))
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}
