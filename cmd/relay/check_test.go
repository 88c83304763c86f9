package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/relaycheck"
)

// TestCheck runs `relay check` (the real binary, so main's dispatch too) on
// laptop a against laptop b, which cannot talk directly, in one tailnet
// through three states: no relay grant (it names the missing grant), the
// grant and a running relay (it reports the relay's endpoint and exits 0),
// and the relay stopped (it reports DERP only, the relay offline, and
// exits 1).
func TestCheck(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	// The tailnet starts without the relay grant. Set before any node
	// joins: testcontrol reads the field without a lock.
	control.Server.PeerRelayGrants = false

	// The only way into the relay is its static endpoint, a port forward,
	// so the endpoint check names can only be it.
	relayPort, fwdAddr := forwardedRelayPort(t, "127.0.0.1:0")
	endpoint := fwdAddr.String()
	relay := startRelay(t, bins, "relay",
		"TS_CONTROL_URL="+control.URL,
		"TS_STATE_DIR="+t.TempDir(),
		"TS_HOSTNAME=relay",
		"TS_RELAY_SERVER_PORT="+strconv.Itoa(relayPort),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS="+endpoint,
		"TS_AUTHKEY="+control.AuthKey,
	)
	waitReady(t, relay)
	rs, err := relay.Status(t.Context())
	if err != nil || len(rs.TailscaleIPs) == 0 {
		t.Fatalf("relay status: %+v, %v", rs, err)
	}
	relayIP := rs.TailscaleIPs[0]

	a := tailnettest.StartLaptopForTest(t, bins, "a")
	b := tailnettest.StartLaptopForTest(t, bins, "b")
	tailnettest.UpForTest(t, control, a)
	ipB := tailnettest.UpForTest(t, control, b)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	for _, ip := range []netip.Addr{ipB, relayIP} {
		if err := a.WaitForPeer(ctx, ip); err != nil {
			t.Fatal(err)
		}
	}

	// No grant: DERP only, and the diagnosis names the missing grant.
	rep, _ := checkJSON(t, ctx, a, 1, "--timeout=5s", ipB.String())
	p := onlyPeer(t, rep)
	if p.Via != relaycheck.ViaDERP || p.Diagnosis == nil || p.Diagnosis.Code != relaycheck.CodeNoRelayServers ||
		!strings.Contains(p.Diagnosis.Message, `"tailscale.com/cap/relay"`) {
		t.Errorf("without the grant: via %q, diagnosis %+v; want via derp, %s naming tailscale.com/cap/relay",
			p.Via, p.Diagnosis, relaycheck.CodeNoRelayServers)
	}

	// Grant the relay capabilities live, as an admin editing the policy.
	control.Server.SetGlobalAppCaps(tailcfg.PeerCapMap{
		tailcfg.PeerCapabilityRelay:       nil,
		tailcfg.PeerCapabilityRelayTarget: nil,
	})
	for _, l := range []*tailnettest.Laptop{a, b} {
		waitRelayServer(t, ctx, l, relayIP)
	}

	// The relay carries the traffic, through its static endpoint, exit 0.
	// By name, the path is not credited to it: the endpoint (a port
	// forward) is none of the relay node's own addresses, so the laptop
	// cannot tell it from a relay the peer chose. By endpoint, it is the
	// expected one.
	rep, elapsed := checkJSON(t, ctx, a, 0, "--relay=relay", ipB.String())
	p = onlyPeer(t, rep)
	last := p.Path[len(p.Path)-1]
	switch {
	case !rep.OK || !p.OK || p.Via != relaycheck.ViaPeerRelay || p.Relay == nil:
		t.Errorf("with relay: ok %v/%v via %q relay %+v; want ok via peer-relay", rep.OK, p.OK, p.Via, p.Relay)
	case p.Relay.Endpoint != endpoint || p.Relay.Name != "" || p.Relay.IP != "" || p.Relay.Expected != nil ||
		!strings.Contains(p.Note, "through a peer relay at "+endpoint+", not identified"):
		t.Errorf("relay = %+v (expected %v), note %q; want endpoint %s, not identified, not credited", p.Relay, p.Relay.Expected, p.Note, endpoint)
	case last.Kind != relaycheck.ViaPeerRelay || last.Endpoint != endpoint || last.Pongs < 3 || p.FirstRelayedOrDirectMs == nil:
		t.Errorf("path = %+v, first relayed after %v ms; want it to end with 3 or more pongs via %s", p.Path, p.FirstRelayedOrDirectMs, endpoint)
	}
	t.Logf("relayed check took %v", elapsed)
	text, _ := runCheck(t, ctx, a, 0, "--relay="+endpoint, ipB.String())
	for _, want := range []string{"OK via peer-relay " + endpoint + " vni ", "peer-relay(" + endpoint + " vni ", "as expected"} {
		if !strings.Contains(text, want) {
			t.Errorf("human report does not contain %q:\n%s", want, text)
		}
	}

	// The relay stops: DERP only, the relay offline, exit 1. a trusts its
	// relay path to b for 6.5 s after the last pong through it and pings
	// only that path meanwhile, so the first seconds' pings go unanswered;
	// the longer timeout leaves room for DERP pongs after that.
	if err := relay.Stop(ctx); err != nil {
		t.Fatalf("stop relay: %v", err)
	}
	rep, _ = checkJSON(t, ctx, a, 1, "--timeout=15s", "--relay=relay", ipB.String())
	p = onlyPeer(t, rep)
	if p.Via != relaycheck.ViaDERP || p.Diagnosis == nil || p.Diagnosis.Code != relaycheck.CodeRelayOffline ||
		!strings.Contains(p.Diagnosis.Message, "relay ("+relayIP.String()+") is offline") {
		t.Errorf("relay stopped: via %q, diagnosis %+v; want via derp, %s naming relay (%s)",
			p.Via, p.Diagnosis, relaycheck.CodeRelayOffline, relayIP)
	}
}

// runCheck runs `relay check --socket=<l's socket> args...` and returns its
// standard output and how long it took, failing the test unless it exits
// with wantCode.
func runCheck(t *testing.T, ctx context.Context, l *tailnettest.Laptop, wantCode int, args ...string) (string, time.Duration) {
	t.Helper()
	bins := binaries(t)
	cmd := exec.CommandContext(ctx, bins.Relay, append([]string{"check", "--socket=" + l.Socket}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	elapsed := time.Since(start)
	code := 0
	if exitErr, ok := errors.AsType[*exec.ExitError](err); ok {
		code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatalf("relay check %q: %v", args, err)
	}
	t.Logf("relay check %s: exit %d after %v\n%s%s", strings.Join(args, " "), code, elapsed.Round(time.Millisecond), stdout.String(), stderr.String())
	if code != wantCode {
		t.Fatalf("relay check %q exited %d, want %d", args, code, wantCode)
	}
	return stdout.String(), elapsed
}

// checkJSON is runCheck with --json, decoding the report.
func checkJSON(t *testing.T, ctx context.Context, l *tailnettest.Laptop, wantCode int, args ...string) (*relaycheck.Report, time.Duration) {
	t.Helper()
	out, elapsed := runCheck(t, ctx, l, wantCode, append([]string{"--json"}, args...)...)
	var rep relaycheck.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("relay check --json output: %v\n%s", err, out)
	}
	return &rep, elapsed
}

func onlyPeer(t *testing.T, rep *relaycheck.Report) relaycheck.PeerReport {
	t.Helper()
	if len(rep.Peers) != 1 {
		t.Fatalf("report has %d peers, want 1: %+v", len(rep.Peers), rep)
	}
	return rep.Peers[0]
}

// waitRelayServer waits until l lists ip among its peer relay servers, as
// `tailscale debug peer-relay-servers` shows them.
func waitRelayServer(t *testing.T, ctx context.Context, l *tailnettest.Laptop, ip netip.Addr) {
	t.Helper()
	var last any
	err := tailnettest.WaitFor(ctx, 50*time.Millisecond, func() (bool, error) {
		v, err := l.LocalClient().DebugResultJSON(ctx, "peer-relay-servers")
		if err != nil {
			return false, err
		}
		last = v
		list, _ := v.([]any)
		return slices.Contains(list, any(ip.String())), nil
	})
	if err != nil {
		t.Fatalf("%s never listed the relay %s as a peer relay server (last: %v): %v", l.Name, ip, last, err)
	}
}
