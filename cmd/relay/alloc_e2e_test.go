package main

import (
	"context"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/disco"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/relayserver"
)

// allocScene is a relay on a loopback tailnet and a member of that tailnet
// (the relay grant included) whose keys the test holds, so that it can send
// the relay any allocation request.
type allocScene struct {
	control    *tailnettest.Control
	relay      *tailnettest.Relay
	member     *tailnettest.Member
	relayNode  key.NodePublic
	relayDisco key.DiscoPublic // the relay node's (magicsock's) disco key
	endpoint   netip.AddrPort  // the relay's static endpoint
	gen        uint32          // the last Generation sent
}

func newAllocScene(t *testing.T, bins tailnettest.Binaries, name string) *allocScene {
	t.Helper()
	control := tailnettest.StartControlForTest(t)
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	s := &allocScene{control: control, endpoint: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))}
	s.relay = startRelay(t, bins, name,
		"TS_CONTROL_URL="+control.URL,
		"TS_STATE_DIR="+t.TempDir(),
		"TS_HOSTNAME=relay",
		"TS_AUTHKEY="+control.AuthKey,
		"TS_RELAY_SERVER_PORT="+strconv.Itoa(port),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS="+s.endpoint.String(),
	)
	waitReady(t, s.relay)
	node := control.NodeByHostname("relay")
	if node == nil || node.DiscoKey.IsZero() {
		t.Fatalf("control does not know the relay's node and disco key: %+v", node)
	}
	s.relayNode, s.relayDisco = node.Key, node.DiscoKey
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	s.member, err = tailnettest.AddMember(ctx, control, "mallory", 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.member.Close() })
	return s
}

// ask sends an allocation request for the pair (member, other) as the
// member, and returns its Generation.
func (s *allocScene) ask(t *testing.T, other key.DiscoPublic) uint32 {
	t.Helper()
	s.gen++
	req := &disco.AllocateUDPRelayEndpointRequest{
		ClientDisco: [2]key.DiscoPublic{s.member.Disco.Public(), other},
		Generation:  s.gen,
	}
	if err := s.member.SendDisco(s.relayNode, s.relayDisco, req); err != nil {
		t.Fatal(err)
	}
	return s.gen
}

// answer waits up to wait for the relay's answer to request gen.
func (s *allocScene) answer(ctx context.Context, gen uint32, wait time.Duration) (*disco.AllocateUDPRelayEndpointResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	d, err := s.member.RecvDisco(ctx, func(d tailnettest.DiscoFrom) bool {
		r, ok := d.Msg.(*disco.AllocateUDPRelayEndpointResponse)
		return ok && d.Node == s.relayNode && r.Generation == gen
	})
	if err != nil {
		return nil, err
	}
	return d.Msg.(*disco.AllocateUDPRelayEndpointResponse), nil
}

// allocate asks for an endpoint for (member, a new peer) until the relay
// answers: at first the relay may not know the member yet (its netmap
// catches up within seconds).
func (s *allocScene) allocate(t *testing.T) *disco.AllocateUDPRelayEndpointResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	for {
		other := key.NewDisco().Public()
		gen := s.ask(t, other)
		resp, err := s.answer(ctx, gen, 2*time.Second)
		if err == nil {
			want := key.NewSortedPairOfDiscoPublic(s.member.Disco.Public(), other).Get()
			if resp.ClientDisco != want || resp.ServerDisco.IsZero() || !slices.Contains(resp.AddrPorts, s.endpoint) {
				t.Fatalf("answer = %+v, want ClientDisco %v, a server key and the endpoint %v", resp, want, s.endpoint)
			}
			return resp
		}
		if ctx.Err() != nil {
			t.Fatalf("the relay never answered a well-formed allocation request: %v", err)
		}
	}
}

// askZero sends the request that crashes Tailscale v1.102.5's relay
// server: the member's own disco key, and a zero one.
func (s *allocScene) askZero(t *testing.T) {
	t.Helper()
	s.ask(t, key.DiscoPublic{})
}

// TestHostileAllocationRequest sends the relay binary, over the tailnet's
// DERP server and from a genuine member with the relay grant, the
// allocation request that kills Tailscale v1.102.5's relay server (one
// ClientDisco key zero). The relay must stay up and ready, count and log
// the rejection, and still serve the same member. Built with Tailscale's
// own feature/relayserver instead (the tsrelay_upstream_relayserver tag),
// the same request must kill it: that is what shows this test detects the
// crash.
func TestHostileAllocationRequest(t *testing.T) {
	bins := binaries(t)
	t.Run("tsrelay", func(t *testing.T) {
		s := newAllocScene(t, bins, "relay-guarded")
		first := s.allocate(t)

		s.askZero(t)
		s.askZero(t)
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		var rejected float64
		err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
			m, err := s.relay.Metrics(ctx)
			if err != nil {
				return false, nil
			}
			rejected, _ = tailnettest.MetricSum(m, "tsrelay_relay_alloc_rejected_total", "reason", string(relayserver.ReasonZeroKey))
			return rejected >= 2, nil
		})
		if err != nil {
			t.Fatalf("tsrelay_relay_alloc_rejected_total{reason=%q} = %v, want 2: %v", relayserver.ReasonZeroKey, rejected, err)
		}
		select {
		case <-s.relay.Done():
			t.Fatalf("relay exited: %v\n%s", s.relay.Wait(ctx), s.relay.LogTail(40))
		default:
		}
		if code, body, err := s.relay.Get(ctx, "/readyz"); err != nil || code != http.StatusOK {
			t.Errorf("/readyz after the hostile requests = %d %q, %v; want 200", code, body, err)
		}

		again := s.allocate(t)
		if again.ServerDisco != first.ServerDisco {
			t.Errorf("server disco key changed from %v to %v: the relay server restarted", first.ServerDisco.ShortString(), again.ServerDisco.ShortString())
		}
		if again.VNI == first.VNI {
			t.Errorf("a new pair got the first pair's VNI %d", again.VNI)
		}

		// One log line for the two requests: at most one per sender a minute.
		log := readFile(t, s.relay.LogPath())
		var lines []string
		for l := range strings.SplitSeq(log, "\n") {
			if strings.Contains(l, "rejected a relay endpoint request") {
				lines = append(lines, l)
			}
		}
		if len(lines) != 1 || !strings.Contains(lines[0], string(relayserver.ReasonZeroKey)) ||
			!strings.Contains(lines[0], s.member.Node.Public().ShortString()) {
			t.Errorf("log lines about rejections = %q, want one naming the member and %s", lines, relayserver.ReasonZeroKey)
		}
		t.Logf("rejected: %v; log: %s", rejected, strings.Join(lines, "\n"))
	})

	t.Run("upstream feature/relayserver crashes", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
		defer cancel()
		dir, err := tailnettest.CheckoutBinDir(ctx, "tsrelay-e2e-upstream-bin")
		if err != nil {
			t.Fatal(err)
		}
		upstream := bins
		if upstream.Relay, err = tailnettest.BuildRelay(ctx, dir, "tsrelay_upstream_relayserver"); err != nil {
			t.Fatal(err)
		}
		s := newAllocScene(t, upstream, "relay-upstream")
		s.allocate(t) // it works, and knows the member

		s.askZero(t)
		select {
		case <-s.relay.Done():
		case <-time.After(30 * time.Second):
			t.Fatalf("the upstream relay server survived the zero-key request; this test no longer shows the crash it guards against")
		}
		log := readFile(t, s.relay.LogPath())
		i := strings.Index(log, "panic: ")
		if i < 0 || !strings.Contains(log[i:], "can't compute shared secret with zero keys") ||
			!strings.Contains(log[i:], "key.DiscoPrivate.Shared") {
			t.Fatalf("relay exited (%v) without the zero-key panic in key.DiscoPrivate.Shared; log:\n%s", s.relay.Wait(ctx), s.relay.LogTail(60))
		}
		trace := strings.Join(strings.SplitN(log[i:], "\n", 16)[:15], "\n")
		t.Logf("the upstream build died as expected (%v):\n%s", s.relay.Wait(ctx), trace)
	})
}

// sendZeroVia sends the relay's node, as the member, a CallMeMaybeVia (an
// endpoint the member says it allocated on some relay for the two of them)
// naming a zero relay server key. Tailscale v1.102.5's relayManager panics
// on it in ensureDiscoInfoFor (v1.104 drops it); only a node that may not
// use other relays (disable-relay-client) ignores it.
func (s *allocScene) sendZeroVia(t *testing.T) {
	t.Helper()
	via := &disco.CallMeMaybeVia{UDPRelayEndpoint: disco.UDPRelayEndpoint{
		ClientDisco:         [2]key.DiscoPublic{s.member.Disco.Public(), s.relayDisco},
		LamportID:           1,
		VNI:                 1,
		BindLifetime:        30 * time.Second,
		SteadyStateLifetime: 5 * time.Minute,
		AddrPorts:           []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")},
	}}
	if err := s.member.SendDisco(s.relayNode, s.relayDisco, via); err != nil {
		t.Fatal(err)
	}
}

// waitRelayClient waits until the relay's tsrelay_relay_client_enabled
// is want.
func (s *allocScene) waitRelayClient(t *testing.T, want float64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var got float64
	err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		m, err := s.relay.Metrics(ctx)
		if err != nil {
			return false, nil
		}
		got, _ = tailnettest.MetricSum(m, "tsrelay_relay_client_enabled")
		return got == want, nil
	})
	if err != nil {
		t.Fatalf("tsrelay_relay_client_enabled = %v, want %v: %v", got, want, err)
	}
}

// TestRelayClientZeroServerDisco covers the relay's node as a relay client.
// Any peer may send it a CallMeMaybeVia, no grant needed, and at Tailscale
// v1.102.5 one with a zero relay key kills the process; the extension
// cannot see it (magicsock handles it). The tailnet closes it by giving the
// relay the disable-relay-client node attribute, which the relay reports
// (tsrelay_relay_client_enabled, relay.clientEnabled on /readyz?verbose,
// a warning in the log); the README says so.
func TestRelayClientZeroServerDisco(t *testing.T) {
	bins := binaries(t)
	t.Run("disable-relay-client closes it", func(t *testing.T) {
		s := newAllocScene(t, bins, "relay-noclient")
		s.waitRelayClient(t, 1)
		s.control.Server.SetNodeCapMap(s.relayNode, tailcfg.NodeCapMap{tailcfg.NodeAttrDisableRelayClient: nil})
		s.waitRelayClient(t, 0)
		s.allocate(t) // the relay knows the member
		s.sendZeroVia(t)
		s.allocate(t) // and read past the CallMeMaybeVia (one DERP stream, in order)
		select {
		case <-s.relay.Done():
			t.Fatalf("relay exited: %v\n%s", s.relay.Wait(t.Context()), s.relay.LogTail(40))
		default:
		}
		if code, body, err := s.relay.Get(t.Context(), "/readyz"); err != nil || code != http.StatusOK {
			t.Errorf("/readyz = %d %q, %v; want 200", code, body, err)
		}
	})
	t.Run("without it Tailscale v1.102.5 crashes", func(t *testing.T) {
		s := newAllocScene(t, bins, "relay-client")
		s.waitRelayClient(t, 1)
		if st, err := s.relay.Status(t.Context()); err != nil || !st.Relay.ClientEnabled {
			t.Errorf("/readyz?verbose relay.clientEnabled = false (%v), want true without disable-relay-client", err)
		}
		if log := readFile(t, s.relay.LogPath()); !strings.Contains(log, "relay client enabled") {
			t.Errorf("the relay did not log that its relay client is enabled")
		}
		s.allocate(t)
		s.sendZeroVia(t)
		select {
		case <-s.relay.Done():
		case <-time.After(30 * time.Second):
			t.Fatalf("the relay survived a zero-key CallMeMaybeVia with its relay client on: Tailscale fixed relayManager? Then drop this subtest and the README's caveat")
		}
		log := readFile(t, s.relay.LogPath())
		i := strings.Index(log, "panic: ")
		if i < 0 || !strings.Contains(log[i:], "can't compute shared secret with zero keys") || !strings.Contains(log[i:], "relayManager") {
			t.Fatalf("relay exited (%v) without the zero-key panic in relayManager; log:\n%s", s.relay.Wait(t.Context()), s.relay.LogTail(60))
		}
		t.Logf("died as Tailscale v1.102.5 does:\n%s", strings.Join(strings.SplitN(log[i:], "\n", 12)[:11], "\n"))
	})
}
