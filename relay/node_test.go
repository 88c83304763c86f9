package relay

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// TestReappliesDriftedPrefs runs the appliance in process against the
// loopback control server, turns the relay off behind its back through the
// node's local API, and checks that the relay comes back without a restart,
// woken by the prefs change on the IPN bus: the periodic resync is pushed
// past the test's deadline, so it cannot be what restores them.
func TestReappliesDriftedPrefs(t *testing.T) {
	cfg := inProcessConfig(t)
	port, ep := int(cfg.RelayServerPort), cfg.RelayServerStaticEndpoints[0]
	a := testAppliance(t, cfg, "")
	a.resync = time.Hour
	ctx := t.Context()
	runForTest(t, a)

	waitReady := func(what string) {
		t.Helper()
		wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
		defer wcancel()
		err := tailnettest.WaitFor(wctx, 50*time.Millisecond, func() (bool, error) {
			ready, _ := a.status.readiness()
			return ready, nil
		})
		if err != nil {
			_, reason := a.status.readiness()
			t.Fatalf("%s: not ready (%s): %v", what, reason, err)
		}
	}
	waitReady("start")

	// Someone clears the relay prefs, as `tailscale set --relay-server-port=""` would.
	lc := a.localClient()
	if _, err := lc.EditPrefs(ctx, &ipn.MaskedPrefs{RelayServerPortSet: true, RelayServerStaticEndpointsSet: true}); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	err := tailnettest.WaitFor(wctx, 20*time.Millisecond, func() (bool, error) {
		p, err := lc.GetPrefs(wctx)
		if err != nil {
			return false, err
		}
		return p.RelayServerPort != nil && *p.RelayServerPort == uint16(port) &&
			len(p.RelayServerStaticEndpoints) == 1 && p.RelayServerStaticEndpoints[0] == ep, nil
	})
	if err != nil {
		t.Fatalf("relay prefs were not re-applied after drift: %v", err)
	}
	waitReady("after drift")
	rs, err := lc.DebugPeerRelaySessions(ctx)
	if err != nil || rs.UDPPort == nil || *rs.UDPPort != uint16(port) {
		t.Errorf("relay after drift: %+v, %v; want bound on %d", rs, err, port)
	}
}

// testAppliance returns an appliance for cfg, following Service service
// ("namespace/name", or "") as Run wires it, logging to the test.
// inProcessConfig skips the test in -short mode, starts the loopback
// control and returns a relay Config that logs in to it: hostname "relay",
// a fresh state directory, a free relay port, and that port on 127.0.0.1 as
// the static endpoint.
func inProcessConfig(t *testing.T) Config {
	t.Helper()
	if testing.Short() {
		t.Skip("runs a tailnet; skipped in -short mode")
	}
	control := tailnettest.StartControlForTest(t)
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	return Config{
		AuthKey:                    control.AuthKey,
		ControlURL:                 control.URL,
		Hostname:                   "relay",
		StateDir:                   t.TempDir(),
		RelayServerPort:            Port(port),
		RelayServerStaticEndpoints: Endpoints{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))},
	}
}

func testAppliance(t *testing.T, cfg Config, service string) *tailnetNode {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(t.Output(), nil))
	return newTailnetNode(cfg, tailnetNodeDeps{status: newStatus(uint16(cfg.RelayServerPort), service)}, logger)
}

// runForTest runs a in process, with the loops in also (the Service watch,
// say), until the test ends; a's run stops the node. It keeps the node on
// this machine: no UPnP/PCP probes of the gateway, and a panic rather than
// a dial to Tailscale's control.
func runForTest(t *testing.T, a *tailnetNode, also ...func(context.Context) error) {
	envknob.Setenv("TS_DISABLE_PORTMAPPER", "1")
	envknob.Setenv("TS_PANIC_IF_HIT_MAIN_CONTROL", "1")
	ctx, cancel := context.WithCancel(t.Context())
	loops := append([]func(context.Context) error{a.run}, also...)
	done := make(chan error, len(loops))
	for _, run := range loops {
		go func() { done <- run(ctx) }()
	}
	t.Cleanup(func() {
		cancel()
		for range loops {
			<-done
		}
	})
}

// TestFailedStartDoesNotPanic checks that a node that cannot start (here its
// state directory is a file) makes run return the error, and that its
// shutdown does not close what never started.
func TestFailedStartDoesNotPanic(t *testing.T) {
	notADir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notADir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	a := testAppliance(t, Config{
		ControlURL:      "http://127.0.0.1:1",
		Hostname:        "relay",
		StateDir:        notADir,
		RelayServerPort: 40000,
	}, "")
	a.resync = time.Hour
	// run closes the node on its way out, which must not panic.
	err := a.run(t.Context())
	if err == nil || !strings.Contains(err.Error(), "start tailscale") {
		t.Fatalf("run with an unusable state dir = %v, want a start error", err)
	}
}
