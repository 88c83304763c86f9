package relayserver

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"tailscale.com/disco"
	"tailscale.com/net/packet"
	"tailscale.com/net/stun"

	"github.com/tsrelay/tsrelay/internal/udpsock"
)

// datagram is one datagram sent at a filtered socket.
type datagram struct {
	name string
	b    []byte
	pass bool // the server acts on it: the filter must pass it
}

// geneve returns a Geneve header as Tailscale's clients write it
// (packet.GeneveHeader.Encode) followed by payload.
func geneve(t *testing.T, protocol uint16, control bool, payload []byte) []byte {
	t.Helper()
	h := packet.GeneveHeader{Protocol: protocol, Control: control}
	h.VNI.Set(0xABCDEF)
	b := make([]byte, packet.GeneveFixedHeaderLength, packet.GeneveFixedHeaderLength+len(payload))
	if err := h.Encode(b); err != nil {
		t.Fatal(err)
	}
	return append(b, payload...)
}

// datagrams is what the filter is tried with: every shape Tailscale's
// clients and STUN servers send the relay server, built with Tailscale's
// own encoders, and the junk an attacker would.
func datagrams(t *testing.T) []datagram {
	discoMsg := append([]byte(disco.Magic), bytes.Repeat([]byte{0xD1}, 32+24+40)...)
	wgKeepalive := append([]byte{4, 0, 0, 0}, make([]byte, 28)...)
	wgData := append([]byte{4, 0, 0, 0}, bytes.Repeat([]byte{0x77}, 1300)...)
	stunReply := stun.Response(stun.NewTxID(), netip.MustParseAddrPort("203.0.113.7:41641"))
	// with mutates a copy of b.
	with := func(b []byte, f func([]byte)) []byte {
		c := bytes.Clone(b)
		f(c)
		return c
	}
	relayedWG := geneve(t, packet.GeneveProtocolWireGuard, false, wgKeepalive)
	random := make([]byte, 1200)
	for i := range random {
		random[i] = byte(i*131 + 7)
	}
	return []datagram{
		{"disco handshake to the server (Geneve control, disco)", geneve(t, packet.GeneveProtocolDisco, true, discoMsg), true},
		{"disco between clients (Geneve, disco)", geneve(t, packet.GeneveProtocolDisco, false, discoMsg), true},
		{"WireGuard keepalive (Geneve, the shortest relayed datagram)", relayedWG, true},
		{"WireGuard data (Geneve)", geneve(t, packet.GeneveProtocolWireGuard, false, wgData), true},
		{"STUN binding success response (address discovery)", stunReply, true},

		{"empty", nil, false},
		{"random bytes", random, false},
		{"a short random datagram", random[:11], false},
		{"Geneve one byte short", relayedWG[:len(relayedWG)-1], false},
		{"Geneve header alone", relayedWG[:packet.GeneveFixedHeaderLength], false},
		{"Geneve version 1", with(relayedWG, func(b []byte) { b[0] |= 0x40 }), false},
		{"Geneve with a reserved flag bit", with(relayedWG, func(b []byte) { b[1] |= 0x01 }), false},
		{"Geneve with its reserved byte set", with(relayedWG, func(b []byte) { b[7] = 1 }), false},
		{"Geneve carrying Ethernet (0x6558)", with(relayedWG, func(b []byte) { binary.BigEndian.PutUint16(b[2:], 0x6558) }), false},
		{"STUN binding request", stun.Request(stun.NewTxID()), false},
		{"STUN error response", with(stunReply, func(b []byte) { b[1] = 0x11 }), false},
		{"STUN success response without the magic cookie", with(stunReply, func(b []byte) { b[4] ^= 0xFF }), false},
		{"STUN success response cut to 19 bytes", stunReply[:19], false},
	}
}

// TestFilterOnRealSockets attaches the filter with filterSockets to real
// sockets of this process, found as the relay finds the server's, and
// sends them every datagram of datagrams: exactly those the server acts
// on arrive, and the kernel counts the others as the socket's drops.
func TestFilterOnRealSockets(t *testing.T) {
	for _, fam := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(fam.network, func(t *testing.T) {
			pc, err := net.ListenPacket(fam.network, fam.addr)
			if err != nil {
				t.Fatalf("listen %s %s: %v", fam.network, fam.addr, err)
			}
			rx := pc.(*net.UDPConn)
			defer rx.Close()
			port := rx.LocalAddr().(*net.UDPAddr).AddrPort().Port()
			n, err := filterSockets(port)
			if err != nil || n != 1 {
				t.Fatalf("filterSockets(%d) = %d, %v; want 1 socket filtered", port, n, err)
			}
			tx, err := net.DialUDP(fam.network, nil, rx.LocalAddr().(*net.UDPAddr))
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Close()

			all := datagrams(t)
			// The last one passes and tells the reader that all before it
			// were delivered or dropped: loopback keeps their order.
			sentinel := geneve(t, packet.GeneveProtocolDisco, true, []byte("sentinel: end of the datagrams under test"))
			var wantPass, wantDrop int
			for _, d := range all {
				if _, err := tx.Write(d.b); err != nil {
					t.Fatalf("send %s: %v", d.name, err)
				}
				if d.pass {
					wantPass++
				} else {
					wantDrop++
				}
			}
			if _, err := tx.Write(sentinel); err != nil {
				t.Fatal(err)
			}
			rx.SetReadDeadline(time.Now().Add(10 * time.Second))
			var got [][]byte
			buf := make([]byte, 2048)
			for {
				n, err := rx.Read(buf)
				if err != nil {
					t.Fatalf("read (after %d datagrams): %v", len(got), err)
				}
				if bytes.Equal(buf[:n], sentinel) {
					break
				}
				got = append(got, bytes.Clone(buf[:n]))
			}
			for _, d := range all {
				arrived := false
				for _, g := range got {
					arrived = arrived || bytes.Equal(g, d.b)
				}
				if d.pass && !arrived {
					t.Errorf("%s (%d bytes): dropped, but the relay server acts on it", d.name, len(d.b))
				}
				if !d.pass && arrived {
					t.Errorf("%s (%d bytes): passed, want it dropped in the kernel", d.name, len(d.b))
				}
			}
			if len(got) != wantPass {
				t.Errorf("%d datagrams arrived, want %d", len(got), wantPass)
			}
			socks, err := udpsock.List(0, int(port))
			if err != nil || len(socks) != 1 {
				t.Fatalf("udpsock.List = %+v, %v", socks, err)
			}
			if socks[0].Drops != uint64(wantDrop) {
				t.Errorf("the socket counts %d drops, want %d (every datagram the filter refused)", socks[0].Drops, wantDrop)
			}
		})
	}
}

// TestFilterSocketsNoneBound reports a port with no socket of this process
// as an error instead of filtering nothing quietly.
func TestFilterSocketsNoneBound(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := pc.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	pc.Close()
	if n, err := filterSockets(port); err == nil || n != 0 {
		t.Errorf("filterSockets(%d) with nothing bound = %d, %v; want 0 and an error", port, n, err)
	}
}
