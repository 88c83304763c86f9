package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// forwardedPackets is the relay's counter of packets it forwarded, by the
// family they came in on and the one they went out on.
const forwardedPackets = "tailscaled_peer_relay_forwarded_packets_total"

// families are the (transport_in, transport_out) pairs of forwardedPackets.
var families = [][2]string{{"udp4", "udp4"}, {"udp4", "udp6"}, {"udp6", "udp4"}, {"udp6", "udp6"}}

// forwardedByFamily returns forwardedPackets for each of families.
func forwardedByFamily(t *testing.T, m map[string]*dto.MetricFamily) map[[2]string]float64 {
	t.Helper()
	out := make(map[[2]string]float64, len(families))
	for _, f := range families {
		out[f], _ = tailnettest.MetricSum(m, forwardedPackets, "transport_in", f[0], "transport_out", f[1])
	}
	return out
}

// requireIPv6Loopback fails the test, saying what failed, when this machine
// cannot send UDP over ::1: every IPv6 test here needs it, and a skip would
// hide that `make test` proved nothing about IPv6.
func requireIPv6Loopback(t *testing.T) {
	t.Helper()
	pc, err := net.ListenPacket("udp6", "[::1]:0")
	if err != nil {
		t.Fatalf("IPv6 loopback unusable (is net.ipv6.conf.lo.disable_ipv6 set?): %v", err)
	}
	defer pc.Close()
	if _, err := pc.WriteTo([]byte("x"), pc.LocalAddr()); err != nil {
		t.Fatalf("IPv6 loopback unusable: send to %v: %v", pc.LocalAddr(), err)
	}
}

// pingUntilVia pings from a to ip, a few pings at a time as a user would
// retry `tailscale ping`, until a pong comes via wantVia, and returns that
// output. It fails the test if none does within a minute.
func pingUntilVia(t *testing.T, ctx context.Context, a *tailnettest.Laptop, ip netip.Addr, wantVia string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var out []byte
	err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		var err error
		out, err = a.CLI(ctx, "ping", "--c=3", "--until-direct=false", ip.String())
		return err == nil && strings.Contains(string(out), wantVia), nil
	})
	if err != nil {
		t.Fatalf("no pong from %s to %s via %q: %v\nlast output:\n%s", a.Name, ip, wantVia, err, out)
	}
	t.Logf("tailscale ping from %s to %s:\n%s", a.Name, ip, out)
	return string(out)
}

// TestRelayOverIPv6 runs the real relay binary with one static endpoint
// per family, 127.0.0.1:port and [::1]:port, and two pairs of real
// tailscaled laptops that cannot talk directly. First the IPv4 endpoint
// (and every other address of the machine) is sunk, so the only way in is
// IPv6: a's pongs must come via peer-relay([::1]:port:vni:N) and the relay
// must forward udp6 to udp6 and nothing over IPv4. Then each of the second
// pair can reach the relay in one family only, c over IPv4 and d over
// IPv6, so the relay must forward between families, both ways.
//
// The relay never advertises ::1 by itself (Tailscale's netmon reports
// loopback addresses apart, and the relay server uses only the others), and
// the test's STUN server is IPv4-only: [::1]:port is advertised only as the
// static endpoint.
func TestRelayOverIPv6(t *testing.T) {
	bins := binaries(t)
	requireIPv6Loopback(t)
	control := tailnettest.StartControlForTest(t)
	relayPort, err := tailnettest.FreeDualStackUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	v4 := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(relayPort))
	v6 := netip.AddrPortFrom(netip.IPv6Loopback(), uint16(relayPort))
	// The relay's discovered addresses (the machine's interface addresses)
	// lead nowhere; the loopback endpoints are sunk per phase below.
	sinkInterfaceAddrs(t, relayPort, func(ip netip.Addr) bool { return !ip.IsLoopback() })

	relay := startRelay(t, bins, "relay",
		"TS_CONTROL_URL="+control.URL,
		"TS_AUTHKEY="+control.AuthKey,
		"TS_STATE_DIR="+t.TempDir(),
		"TS_HOSTNAME=relay",
		"TS_RELAY_SERVER_PORT="+strconv.Itoa(relayPort),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS="+v4.String()+","+v6.String(),
	)
	waitReady(t, relay)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()

	t.Run("OnlyIPv6", func(t *testing.T) {
		closeV4 := sinkUDP(t, v4, netip.AddrPort{})
		before := forwardedByFamily(t, relayMetrics(t, relay))
		a := tailnettest.StartLaptopForTest(t, bins, "a")
		b := tailnettest.StartLaptopForTest(t, bins, "b")
		tailnettest.UpForTest(t, control, a)
		ipB := tailnettest.UpForTest(t, control, b)
		if err := a.WaitForPeer(ctx, ipB); err != nil {
			t.Fatal(err)
		}
		wantVia := fmt.Sprintf("via peer-relay(%s:vni:", v6)
		pingUntilVia(t, ctx, a, ipB, wantVia)
		st, err := a.LocalClient().Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := peerByIP(st, ipB); !ok || !strings.HasPrefix(p.PeerRelay, v6.String()+":vni:") {
			t.Errorf("a's status for b: PeerRelay = %q, want %s:vni:N", p.PeerRelay, v6)
		}
		after := forwardedByFamily(t, relayMetrics(t, relay))
		t.Logf("%s before → after: %v → %v", forwardedPackets, before, after)
		if after[[2]string{"udp6", "udp6"}] <= before[[2]string{"udp6", "udp6"}] {
			t.Errorf(`%s{transport_in="udp6",transport_out="udp6"} did not rise: %v → %v`, forwardedPackets, before, after)
		}
		for _, f := range families[:3] {
			if after[f] != before[f] {
				t.Errorf(`%s{transport_in=%q,transport_out=%q} went %v → %v, want no IPv4 forwarding while only IPv6 reaches the relay`, forwardedPackets, f[0], f[1], before[f], after[f])
			}
		}
		// Stop the pair before the next phase changes what can reach the
		// relay, so that its counters move only with the next pair.
		for _, l := range []*tailnettest.Laptop{a, b} {
			if err := l.Close(); err != nil {
				t.Error(err)
			}
		}
		closeV4()
	})
	if t.Failed() {
		return
	}

	t.Run("MixedFamilies", func(t *testing.T) {
		c := tailnettest.StartLaptopForTest(t, bins, "c")
		d := tailnettest.StartLaptopForTest(t, bins, "d")
		// c's datagrams to the IPv6 endpoint and d's to the IPv4 one are
		// swallowed: c reaches the relay over IPv4 only, d over IPv6 only.
		// Both laptops send from their --port in both families.
		sinkUDP(t, v6, netip.AddrPortFrom(netip.IPv6Loopback(), uint16(c.Port)))
		sinkUDP(t, v4, netip.AddrPortFrom(v4.Addr(), uint16(d.Port)))
		before := forwardedByFamily(t, relayMetrics(t, relay))
		ipC := tailnettest.UpForTest(t, control, c)
		ipD := tailnettest.UpForTest(t, control, d)
		if err := c.WaitForPeer(ctx, ipD); err != nil {
			t.Fatal(err)
		}
		if err := d.WaitForPeer(ctx, ipC); err != nil {
			t.Fatal(err)
		}
		// Each laptop names the relay by the address it itself uses.
		pingUntilVia(t, ctx, c, ipD, fmt.Sprintf("via peer-relay(%s:vni:", v4))
		pingUntilVia(t, ctx, d, ipC, fmt.Sprintf("via peer-relay(%s:vni:", v6))
		after := forwardedByFamily(t, relayMetrics(t, relay))
		t.Logf("%s before → after: %v → %v", forwardedPackets, before, after)
		for _, f := range [][2]string{{"udp4", "udp6"}, {"udp6", "udp4"}} {
			if after[f] <= before[f] {
				t.Errorf(`%s{transport_in=%q,transport_out=%q} did not rise (%v → %v): the relay did not forward between families`, forwardedPackets, f[0], f[1], before[f], after[f])
			}
		}
		rs, err := relay.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var legs []string
		for _, s := range rs.Relay.SessionTable {
			legs = append(legs, s.Clients[0].Endpoint.String()+" ↔ "+s.Clients[1].Endpoint.String())
		}
		t.Logf("relay sessions: %q", legs)
	})
}
