package relayserver

import (
	"net/netip"
	"testing"

	"go4.org/mem"
	"tailscale.com/disco"
	"tailscale.com/net/udprelay"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
	"tailscale.com/types/views"
	"tailscale.com/util/usermetric"
	"tailscale.com/wgengine/magicsock"
)

// FuzzCheck builds allocation requests from the bytes a peer controls (the
// two ClientDisco keys and Generation, as on the wire) plus the sender's
// keys, and checks that Check never panics and that whatever it lets
// through the real server handles without panicking.
func FuzzCheck(f *testing.F) {
	a, b := key.NewDisco().Public(), key.NewDisco().Public()
	zero := make([]byte, 32)
	f.Add(a.AppendTo(nil), b.AppendTo(nil), a.AppendTo(nil), []byte{1}, uint32(1)) // good
	f.Add(a.AppendTo(nil), zero, a.AppendTo(nil), []byte{1}, uint32(1))            // the crash
	f.Add(zero, b.AppendTo(nil), b.AppendTo(nil), []byte{1}, uint32(0))            // zero first
	f.Add(a.AppendTo(nil), a.AppendTo(nil), a.AppendTo(nil), []byte{1}, uint32(2)) // same keys
	f.Add(a.AppendTo(nil), b.AppendTo(nil), zero, []byte{1}, uint32(3))            // sender not a client
	f.Add(a.AppendTo(nil), b.AppendTo(nil), a.AppendTo(nil), []byte{}, uint32(4))  // zero node key
	f.Add([]byte{}, []byte{}, []byte{}, []byte{}, uint32(0))                       // nothing
	// One real relay server for all inputs: what Check accepts is handed
	// to it, so a check that is missing is a panic.
	srv, err := udprelay.NewServer(logger.Discard, 0, true, new(usermetric.Registry), nil)
	if err != nil {
		f.Fatalf("start a relay server: %v", err)
	}
	f.Cleanup(func() { srv.Close() })
	srv.SetStaticAddrPorts(views.SliceOf([]netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:7")}))
	f.Fuzz(func(t *testing.T, k0, k1, sender, nodeSeed []byte, gen uint32) {
		req := magicsock.UDPRelayAllocReq{
			RxFromDiscoKey: discoFrom(sender),
			Message: &disco.AllocateUDPRelayEndpointRequest{
				ClientDisco: [2]key.DiscoPublic{discoFrom(k0), discoFrom(k1)},
				Generation:  gen,
			},
		}
		if len(nodeSeed) > 0 {
			req.RxFromNodeKey = key.NodePublicFromRaw32(mem.B(pad32(nodeSeed)))
		}
		if Check(req, key.DiscoPublic{}) != ReasonNone {
			return
		}
		m := req.Message
		if m.ClientDisco[0].IsZero() || m.ClientDisco[1].IsZero() || m.ClientDisco[0] == m.ClientDisco[1] {
			t.Fatalf("Check accepted %+v", m.ClientDisco)
		}
		se, err := srv.AllocateEndpoint(m.ClientDisco[0], m.ClientDisco[1])
		if err != nil {
			t.Fatalf("AllocateEndpoint after Check: %v", err)
		}
		// The server's key, now known, must be refused as a client key.
		asServer := req
		asServer.Message = &disco.AllocateUDPRelayEndpointRequest{ClientDisco: [2]key.DiscoPublic{req.RxFromDiscoKey, se.ServerDisco}}
		if got := Check(asServer, se.ServerDisco); got != ReasonServerKey {
			t.Fatalf("Check with the server's key = %q, want %q", got, ReasonServerKey)
		}
	})
}

// discoFrom reads a disco key as magicsock does from the wire: 32 bytes,
// here zero-padded or cut, so that short inputs make zero keys.
func discoFrom(b []byte) key.DiscoPublic {
	return key.DiscoPublicFromRaw32(mem.B(pad32(b)))
}

func pad32(b []byte) []byte {
	out := make([]byte, 32)
	copy(out, b)
	return out
}
