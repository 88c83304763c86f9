package derpregion

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// offsiteDelay is the one-way delay in front of the "off-site" region:
// 50 ms more per round trip than the in-cluster region on loopback, about
// what the user report measured to its nearest Tailscale DERP (26-99 ms).
const offsiteDelay = 25 * time.Millisecond

// buildOnce builds tailscaled and tailscale once per test binary run, into
// a stable directory so that a warm run only checks they are up to date.
var buildOnce = sync.OnceValues(func() (tailnettest.Binaries, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	return tailnettest.BuildClients(ctx, filepath.Join(os.TempDir(), "tsrelay-tailnettest-bin"))
})

// regionUnderTest is a derpregion Server on loopback with its certificate
// in a file store, admitting the members of node's tailnet.
type regionUnderTest struct {
	srv    *Server
	cert   *Cert
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
}

func startRegion(t *testing.T, statePath, derpAddr, stunAddr string, node interface {
	Node
	StatusSource
}) *regionUnderTest {
	t.Helper()
	cert, err := SelfSigned(fileStore(t, statePath), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	srv, err := Listen(ServerConfig{DERPAddr: derpAddr, STUNAddr: stunAddr, TLS: cert, Node: node, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &regionUnderTest{srv: srv, cert: cert, reg: prometheus.NewPedanticRegistry(), cancel: cancel, done: make(chan error, 1)}
	r.reg.MustRegister(NewCollector(srv, node, DefaultRegionCode, logger))
	go func() { r.done <- srv.Serve(ctx) }()
	t.Cleanup(r.stop)
	waitFor(t, "the DERP region to serve", srv.Serving)
	return r
}

// stop stops the server and waits for Serve; safe to call twice.
func (r *regionUnderTest) stop() {
	r.cancel()
	if r.done != nil {
		<-r.done
		r.done = nil
	}
}

// laptopStatus is `tailscale status --json` of l.
func laptopStatus(ctx context.Context, l *tailnettest.Laptop) (*ipnstate.Status, error) {
	out, err := l.CLI(ctx, "status", "--json")
	if err != nil {
		return nil, fmt.Errorf("tailscale status --json on %s: %w: %s", l.Name, err, out)
	}
	var st ipnstate.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("decode %s's status: %w", l.Name, err)
	}
	return &st, nil
}

// TestTailnetHomesInCluster is the proof of issue 18 with real tailscaled
// laptops: with an off-site region 50 ms farther away in the DERP map,
// nodes choose the relay's region as home, their first packets to each
// other cross it, strangers are refused, and a restart keeps the
// certificate the derpMap pins.
func TestTailnetHomesInCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three tailscaled processes; skipped in -short mode")
	}
	bins, err := buildOnce()
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()

	// The relay's own tailnet node, which admits DERP clients: a real
	// tailscaled, logged out for now, so admission starts closed.
	relayNode := tailnettest.StartLaptopForTest(t, bins, "relaynode")
	statePath := filepath.Join(t.TempDir(), "state.json")
	region := startRegion(t, statePath, "127.0.0.1:0", "127.0.0.1:0", relayNode.LocalClient())
	derpAddr, stunAddr := region.srv.DERPAddr(), region.srv.STUNAddr()

	// The derpMap exactly as a user pastes it, decoded as control would.
	r, err := Region(RegionOptions{
		RegionID: DefaultRegionID, RegionCode: DefaultRegionCode, Cert: region.cert,
		Addrs:    []netip.Addr{derpAddr.Addr()},
		DERPPort: int(derpAddr.Port()), STUNPort: int(stunAddr.Port()),
	})
	if err != nil {
		t.Fatal(err)
	}
	policy, err := PolicyJSON(r)
	if err != nil {
		t.Fatal(err)
	}
	var pasted tailcfg.DERPMap
	if err := json.Unmarshal(policy, &pasted); err != nil {
		t.Fatalf("decode the derpMap: %v", err)
	}
	control, err := tailnettest.StartControlWith(netip.MustParseAddr("127.0.0.1"), t.Logf, tailnettest.ControlOptions{
		Delay:   offsiteDelay,
		Regions: []*tailcfg.DERPRegion{pasted.Regions[DefaultRegionID]},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(control.Close)

	tailnettest.UpForTest(t, control, relayNode)
	a := tailnettest.StartLaptopForTest(t, bins, "a")
	b := tailnettest.StartLaptopForTest(t, bins, "b")
	tailnettest.UpForTest(t, control, a)
	ipB := tailnettest.UpForTest(t, control, b)

	// Both laptops home on the in-cluster region, as tailscale status
	// reports it (Self.Relay is the home region's code).
	for _, l := range []*tailnettest.Laptop{a, b} {
		var last string
		err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
			st, err := laptopStatus(ctx, l)
			if err != nil {
				return false, err
			}
			last = st.Self.Relay
			return last == DefaultRegionCode, nil
		})
		if err != nil {
			t.Fatalf("%s's home DERP region = %q, want %q: %v", l.Name, last, DefaultRegionCode, err)
		}
	}
	if err := a.WaitForPeer(ctx, ipB); err != nil {
		t.Fatal(err)
	}
	stA, err := laptopStatus(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range stA.Peer {
		if len(p.TailscaleIPs) > 0 && p.TailscaleIPs[0] == ipB && p.Relay != DefaultRegionCode {
			t.Errorf("a sees b homed on %q, want %q", p.Relay, DefaultRegionCode)
		}
	}

	// The first packet from a to b crosses the in-cluster region.
	out, err := a.CLI(ctx, "ping", "--c=3", "--until-direct=false", ipB.String())
	if err != nil {
		t.Fatalf("tailscale ping: %v\n%s", err, out)
	}
	t.Logf("tailscale ping:\n%s", out)
	first, _, _ := strings.Cut(string(out), "\n")
	if want := "via DERP(" + DefaultRegionCode + ")"; !strings.Contains(first, want) {
		t.Errorf("first pong %q, want it %s", first, want)
	}

	// What the relay's metrics see: the laptops connected, packets
	// forwarded, and a and b (peers of the relay node) homed here.
	if err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		return metricValue(t, region.reg, "tsrelay_derp_home_peers") >= 2, nil
	}); err != nil {
		t.Errorf("tsrelay_derp_home_peers = %v, want at least 2 (a and b)", metricValue(t, region.reg, "tsrelay_derp_home_peers"))
	}
	for _, name := range []string{"tsrelay_derp_clients", "tsrelay_derp_packets_sent_total", "tsrelay_derp_stun_requests_total"} {
		if v := metricValue(t, region.reg, name); v == 0 {
			t.Errorf("%s = 0, want more", name)
		}
	}

	// A node outside the tailnet: Tailscale's DERP client with a key the
	// control server never saw.
	refusedBefore := metricValue(t, region.reg, "tsrelay_derp_clients_refused_total")
	if err := connect(t, r, key.NewNode()); err == nil {
		t.Errorf("a node outside the tailnet was admitted")
	}
	if got := metricValue(t, region.reg, "tsrelay_derp_clients_refused_total"); got != refusedBefore+1 {
		t.Errorf("clients refused = %v, want %v", got, refusedBefore+1)
	}

	// A restart on the same store: the same certificate, so the pasted
	// derpMap still holds, and the laptops come back.
	region.stop()
	again := startRegion(t, statePath, derpAddr.String(), stunAddr.String(), relayNode.LocalClient())
	if again.cert.CertName() != region.cert.CertName() || again.cert.Created() {
		t.Fatalf("after a restart CertName = %s (created %v), want %s", again.cert.CertName(), again.cert.Created(), region.cert.CertName())
	}
	var pongs []byte
	if err := tailnettest.WaitFor(ctx, 200*time.Millisecond, func() (bool, error) {
		pongs, _ = a.CLI(ctx, "ping", "--c=1", "--until-direct=false", "--timeout=2s", ipB.String())
		return bytes.Contains(pongs, []byte("via DERP("+DefaultRegionCode+")")), nil
	}); err != nil {
		t.Fatalf("after the region restarted, no pong via DERP(%s): %v\n%s", DefaultRegionCode, err, pongs)
	}
	if err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		return metricValue(t, again.reg, "tsrelay_derp_clients") >= 2, nil
	}); err != nil {
		t.Errorf("after the restart %v DERP clients, want a and b back", metricValue(t, again.reg, "tsrelay_derp_clients"))
	}
}
