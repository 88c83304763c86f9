// Command demo shows tsrelay working on this machine alone: it starts a
// private tailnet on 127.0.0.1 (control, DERP and STUN in this process), the
// real relay binary, and two real tailscaled "laptops" that cannot reach each
// other directly, then pings from one laptop to the other and prints how the
// traffic moves from DERP onto the relay. No Tailscale account is needed and
// nothing leaves the machine. Run it with `make demo`.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

// step prints a numbered heading.
func step(w io.Writer, n int, format string, args ...any) {
	fmt.Fprintf(w, "\n[%d/6] %s\n", n, fmt.Sprintf(format, args...))
}

// indent prints text indented under a step.
func indent(w io.Writer, text string) {
	for line := range strings.SplitSeq(strings.TrimRight(text, "\n"), "\n") {
		fmt.Fprintln(w, "      "+line)
	}
}

// demoTimeout bounds the demo itself, once the binaries are built: on a
// 2-core machine it takes about a minute, so ten mean something is stuck.
// The build is outside it: a cold build on a slow or busy machine can take
// longer than that, and a newcomer's first command must not fail for it.
const demoTimeout = 10 * time.Minute

// buildProgressEvery is how often a long build says it is still going.
const buildProgressEvery = 15 * time.Second

func run(ctx context.Context, w io.Writer) error {
	fmt.Fprintln(w, "tsrelay demo: a private tailnet on 127.0.0.1; no Tailscale account, nothing leaves this machine.")

	step(w, 1, "Building relay, tailscaled and tailscale (the first build takes a few minutes)")
	bins, err := buildWithProgress(ctx, w, filepath.Join(os.TempDir(), "tsrelay-demo-bin"))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, demoTimeout)
	defer cancel()
	work, err := os.MkdirTemp("", "tsrelay-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	step(w, 2, "Starting control, DERP and STUN on 127.0.0.1")
	control, err := tailnettest.StartControl(nil)
	if err != nil {
		return err
	}
	defer control.Close()
	indent(w, "control "+control.URL+", DERP region \"test\"")

	relayPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		return err
	}
	shown := []string{
		"TS_HOSTNAME=relay",
		"TS_RELAY_SERVER_PORT=" + strconv.Itoa(relayPort),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS=127.0.0.1:" + strconv.Itoa(relayPort),
	}
	step(w, 3, "Starting the relay, configured only by its environment")
	for _, e := range shown {
		indent(w, e)
	}
	env := append([]string{
		"TS_AUTHKEY=" + control.AuthKey,
		"TS_CONTROL_URL=" + control.URL,
		"TS_STATE_DIR=" + filepath.Join(work, "relay"),
	}, shown...)
	relay, err := tailnettest.StartRelay(ctx, bins, "relay", filepath.Join(work, "relay.log"), env...)
	if err != nil {
		return err
	}
	defer relay.Close()
	readyStart := time.Now()
	readyCtx, readyCancel := context.WithTimeout(ctx, time.Minute)
	defer readyCancel()
	err = relay.WaitReady(readyCtx, func(code int, body string) {
		indent(w, fmt.Sprintf("%-70s (%.1fs)", fmt.Sprintf("GET /readyz → %d %s", code, strings.TrimSpace(body)), time.Since(readyStart).Seconds()))
	})
	if err != nil {
		return fmt.Errorf("%w\n%s", err, relay.LogTail(20))
	}
	indent(w, "relay log:")
	indent(w, "  "+strings.ReplaceAll(strings.TrimSpace(relay.LogTail(20)), "\n", "\n  "))

	step(w, 4, "Starting two laptops that cannot talk directly (TS_DEBUG_NEVER_DIRECT_UDP), like pods behind hard NAT")
	var ips [2]netip.Addr
	var laptops [2]*tailnettest.Laptop
	for i, name := range []string{"laptop-a", "laptop-b"} {
		l, err := tailnettest.StartLaptop(ctx, bins, filepath.Join(work, name), name)
		if err != nil {
			return err
		}
		defer l.Close()
		if err := l.Up(ctx, control.URL, control.AuthKey); err != nil {
			return err
		}
		ip, err := l.IP(ctx)
		if err != nil {
			return err
		}
		laptops[i], ips[i] = l, ip
		indent(w, fmt.Sprintf("%s is %s", name, ip))
	}
	a := laptops[0]
	if err := a.WaitForPeer(ctx, ips[1]); err != nil {
		return err
	}

	step(w, 5, "laptop-a$ tailscale ping --c=10 --until-direct=false %s", ips[1])
	out, err := a.CLI(ctx, "ping", "--c=10", "--until-direct=false", ips[1].String())
	if err != nil {
		return err
	}
	indent(w, string(out))
	if !strings.Contains(string(out), "via peer-relay(") {
		return errors.New("no pong came through the relay; see " + relay.LogPath())
	}

	sessions, err := sessionTable(ctx, relay)
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "\nThe relay's session table (GET /readyz?verbose):")
	indent(w, sessions)

	// The same question, answered by the relay binary's own subcommand.
	step(w, 6, "laptop-a$ relay check --relay=relay %s", ips[1])
	check := exec.CommandContext(ctx, bins.Relay, "check", "--socket="+a.Socket, "--relay=relay", ips[1].String())
	out, err = check.CombinedOutput()
	indent(w, string(out))
	if err != nil {
		return fmt.Errorf("relay check: %w", err)
	}
	fmt.Fprintln(w, "\nThe first pong crossed DERP; the rest rode the peer relay. In a cluster the relay")
	fmt.Fprintln(w, "sits behind a UDP LoadBalancer IP, and laptops see `via peer-relay(<LB IP>:<port>:vni:N)`.")
	fmt.Fprintln(w, "Cleaning up.")
	return nil
}

// sessionTable renders the relay's sessions from its verbose status.
func sessionTable(ctx context.Context, relay *tailnettest.Relay) (string, error) {
	st, err := relay.Status(ctx)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%-5s %-22s %-22s %s\n", "VNI", "CLIENT 1", "CLIENT 2", "PACKETS/BYTES 1→2, 2→1")
	for _, s := range st.Relay.SessionTable {
		c1, c2 := s.Clients[0], s.Clients[1]
		fmt.Fprintf(&b, "%-5d %-22s %-22s %d/%d, %d/%d\n", s.VNI, c1.Endpoint, c2.Endpoint, c1.PacketsTx, c1.BytesTx, c2.PacketsTx, c2.BytesTx)
	}
	return b.String(), nil
}

// buildWithProgress builds the demo's binaries with no deadline but the
// caller's (Ctrl-C), printing a line every buildProgressEvery so that a
// cold build does not look hung.
func buildWithProgress(ctx context.Context, w io.Writer, dir string) (tailnettest.Binaries, error) {
	start := time.Now()
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(buildProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				indent(w, fmt.Sprintf("still building (%v so far)", time.Since(start).Round(time.Second)))
			}
		}
	})
	bins, err := tailnettest.Build(ctx, dir)
	close(done)
	wg.Wait() // no progress line after the verdict
	if err != nil {
		return bins, fmt.Errorf("build the demo's binaries: %w", err)
	}
	indent(w, fmt.Sprintf("built in %v", time.Since(start).Round(100*time.Millisecond)))
	return bins, nil
}
