package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn/store"
	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/relaycheck"
)

// TestRelayDERPRegion runs the real relay binary with its DERP region on,
// next to an "off-site" region 50 ms farther away, and real laptops: they
// home on the relay's region (its tsnet node admitting them), a's first
// pong to b comes via DERP(tsrelay) before the relay path, relay check on a
// reports b's home region as in-cluster and reachable, and the derpMap the
// relay prints is the one the test control accepted.
func TestRelayDERPRegion(t *testing.T) {
	bins := binaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()

	ports := freeDERPRelayPorts(t)
	// The relay's certificate, made where the relay keeps it, so that the
	// test control's derpMap can pin it before the relay first starts.
	stateDir := t.TempDir()
	region, _ := pinnedRegion(t, stateDir, ports)
	control, err := tailnettest.StartControlWith(netip.MustParseAddr("127.0.0.1"), t.Logf, tailnettest.ControlOptions{
		Delay:   25 * time.Millisecond,
		Regions: []*tailcfg.DERPRegion{region},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(control.Close)

	relay := startRelay(t, bins, "relay", append(ports.env(),
		"TS_CONTROL_URL="+control.URL,
		"TS_AUTHKEY="+control.AuthKey,
		"TS_STATE_DIR="+stateDir,
		"TS_HOSTNAME=relay",
	)...)
	waitReady(t, relay)
	a, ipB := startLaptops(t, bins, control)

	// Both laptops home on the relay's region: a's own home, and b's as
	// control tells a (where a sends its first packets to b).
	var homeA, homeB string
	err = tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		s, err := a.LocalClient().Status(ctx)
		if err != nil {
			return false, err
		}
		homeA = s.Self.Relay
		if p, ok := peerByIP(s, ipB); ok {
			homeB = p.Relay
		}
		return homeA == derpregion.DefaultRegionCode && homeB == derpregion.DefaultRegionCode, nil
	})
	if err != nil {
		t.Fatalf("home regions: a %q, b %q; want both %s: %v", homeA, homeB, derpregion.DefaultRegionCode, err)
	}

	// relay check on a, first, while a's path to b is new: its first
	// pongs come via DERP(tsrelay), which is also what proves that the
	// region admitted a's login. It knows b is homed on the in-cluster
	// region and that a can reach it (the safety rule, checked from the
	// laptop).
	rep, _ := checkJSON(t, ctx, a, 0, "--timeout=30s", ipB.String())
	p := onlyPeer(t, rep)
	if len(p.Path) == 0 || p.Path[0].Kind != relaycheck.ViaDERP || p.Path[0].DERPRegion != derpregion.DefaultRegionCode {
		t.Errorf("relay check path %+v, want it to start via DERP(%s)", p.Path, derpregion.DefaultRegionCode)
	}
	if h := p.Home; h == nil || h.Code != derpregion.DefaultRegionCode || h.ID != derpregion.DefaultRegionID || !h.InCluster || h.Reachable == nil || !*h.Reachable {
		t.Errorf("relay check home region for b = %+v, want %s (%d), in-cluster, reachable", h, derpregion.DefaultRegionCode, derpregion.DefaultRegionID)
	}

	out, err := a.CLI(ctx, "ping", "--c=10", "--until-direct=false", ipB.String())
	if err != nil {
		t.Fatalf("tailscale ping: %v\n%s", err, out)
	}
	t.Logf("tailscale ping from a to b:\n%s", out)
	// The relay may be reached on any address it discovered; its port says
	// it is this relay.
	if want := ":" + strconv.Itoa(ports.relay) + ":vni:"; !strings.Contains(string(out), "via peer-relay(") || !strings.Contains(string(out), want) {
		t.Errorf("no pong via peer-relay(…%s…) after the first", want)
	}

	m := relayMetrics(t, relay)
	for name, least := range map[string]float64{"tsrelay_derp_serving": 1, "tsrelay_derp_home_peers": 2, "tsrelay_derp_clients": 2} {
		if v, _ := tailnettest.MetricSum(m, name); v < least {
			t.Errorf("%s = %v, want at least %v", name, v, least)
		}
	}

	// Now the path is on the relay: unless a pong still comes through the
	// region, the check cannot confirm admission, and says so rather than
	// call the region reachable on a TLS handshake alone.
	rep, _ = checkJSON(t, ctx, a, 0, "--timeout=30s", ipB.String())
	p = onlyPeer(t, rep)
	viaRegion := slices.ContainsFunc(p.Path, func(s relaycheck.Segment) bool {
		return s.Kind == relaycheck.ViaDERP && s.DERPRegion == derpregion.DefaultRegionCode
	})
	if h := p.Home; h == nil || (h.Reachable != nil) != viaRegion || (h.Reachable != nil && !*h.Reachable) ||
		(!viaRegion && !strings.Contains(h.Reason, "no DERP login by this laptop was seen admitted")) {
		t.Errorf("relay check on a relayed path %+v: home %+v; want reachable only with a pong via DERP(%s), else not confirmed", p.Path, h, derpregion.DefaultRegionCode)
	}

	// relay derpmap prints what the test control was given.
	cmd := exec.CommandContext(ctx, bins.Relay, "derpmap")
	cmd.Env = append(tailnettest.ScrubbedEnviron(), "TS_LOCAL_ADDR_PORT="+relay.HTTPAddr)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	printed, err := cmd.Output()
	if err != nil {
		t.Fatalf("relay derpmap: %v\n%s", err, stderr.Bytes())
	}
	var got tailcfg.DERPMap
	if err := json.Unmarshal(printed, &got); err != nil {
		t.Fatalf("decode relay derpmap output: %v\n%s", err, printed)
	}
	if want := (tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{region.RegionID: region}}); !reflect.DeepEqual(got, want) {
		t.Errorf("relay derpmap printed\n%s\nwant the region control serves: %+v", printed, region.Nodes[0])
	}
}

// derpRelayPorts are free ports on 127.0.0.1 for a relay with its DERP
// region on.
type derpRelayPorts struct {
	relay, stun int    // UDP
	derp        int    // TCP
	derpAddr    string // 127.0.0.1:derp
}

// freeDERPRelayPorts picks the ports.
func freeDERPRelayPorts(t *testing.T) derpRelayPorts {
	t.Helper()
	var p derpRelayPorts
	var err error
	if p.relay, err = tailnettest.FreeUDPPort(); err != nil {
		t.Fatal(err)
	}
	if p.stun, err = tailnettest.FreeUDPPort(); err != nil {
		t.Fatal(err)
	}
	if p.derpAddr, err = tailnettest.FreeTCPAddr(); err != nil {
		t.Fatal(err)
	}
	p.derp = int(netip.MustParseAddrPort(p.derpAddr).Port())
	return p
}

// env is the relay's settings for the ports: the relay port with its
// static endpoint on 127.0.0.1, and the DERP and STUN ports.
func (p derpRelayPorts) env() []string {
	return []string{
		"TS_RELAY_SERVER_PORT=" + strconv.Itoa(p.relay),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS=127.0.0.1:" + strconv.Itoa(p.relay),
		"TS_DERP_PORT=" + strconv.Itoa(p.derp),
		"TS_STUN_PORT=" + strconv.Itoa(p.stun),
	}
}

// pinnedRegion makes the DERP region's self-signed certificate where a
// relay with TS_STATE_DIR=stateDir keeps it (tsrelay-derp.json), and
// returns the derpMap region that pins it at 127.0.0.1 on ports, with the
// certificate.
func pinnedRegion(t *testing.T, stateDir string, ports derpRelayPorts) (*tailcfg.DERPRegion, *derpregion.Cert) {
	t.Helper()
	st, err := store.NewFileStore(t.Logf, filepath.Join(stateDir, "tsrelay-derp.json"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := derpregion.SelfSigned(st, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	region, err := derpregion.Region(derpregion.RegionOptions{
		RegionID: derpregion.DefaultRegionID, RegionCode: derpregion.DefaultRegionCode, Cert: cert,
		Addrs:    []netip.Addr{netip.MustParseAddr("127.0.0.1")},
		DERPPort: ports.derp, STUNPort: ports.stun,
	})
	if err != nil {
		t.Fatal(err)
	}
	return region, cert
}
