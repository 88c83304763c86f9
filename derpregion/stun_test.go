package derpregion

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"tailscale.com/net/stun"
)

// TestSTUNNoAmplification sends real STUN requests and junk to the STUN
// server listening as the relay does (a wildcard address: a dual-stack
// socket, where IPv4 clients arrive as IPv4-mapped IPv6 addresses). An
// IPv4 client's answer must be no bigger than its request and carry its
// IPv4 address; junk gets no answer. With net/stunserver's answer (the
// mapped address as IPv6) the answer is 44 bytes to 40 and the test fails.
func TestSTUNNoAmplification(t *testing.T) {
	s := serveSTUN(t, ":0")
	to := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), s.localAddr().Port())
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()

	req := stun.Request(stun.NewTxID())
	answer := junkThenRequest(t, pc, to, [][]byte{
		[]byte("not stun at all"),
		stun.Request(stun.NewTxID())[:20],                     // a header, no attributes
		append(stun.Request(stun.NewTxID())[:36], 0, 0, 0, 0), // a wrong fingerprint
	}, req)
	if len(answer) > len(req) {
		t.Errorf("answer %d bytes to a %d-byte request: amplifies %.2f×", len(answer), len(req), float64(len(answer))/float64(len(req)))
	}
	_, mapped, err := stun.ParseResponse(answer)
	if err != nil {
		t.Fatal(err)
	}
	if want := pc.LocalAddr().(*net.UDPAddr).AddrPort(); mapped != want {
		t.Errorf("mapped address %v, want %v", mapped, want)
	}
	// Only the request was answered: the junk came first, and nothing
	// else arrives.
	pc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := pc.Read(make([]byte, 1500)); err == nil {
		t.Errorf("a second answer (%d bytes): junk was answered", n)
	}
	// The first two never reached the process (bindingRequestFilter);
	// the 40-byte one with a wrong fingerprint did, and was counted.
	waitFor(t, "the junk counted as not STUN and the request as answered", func() bool {
		got := s.dispositions()
		return got["success"] == 1 && got["not_stun"] == 1
	})
}

// TestSTUNFilter sends each kind of junk the bench floods STUN with, and
// then a real binding request (what Tailscale's netcheck sends, over IPv4
// and IPv6), to STUN bound as the relay binds it (dual-stack) and to
// single-stack sockets: the request must be answered, and of the junk only
// what could be a binding request (the type, the magic cookie, 40 bytes
// or more) may reach the process: the rest the kernel drops
// (bindingRequestFilter). Without the filter every piece of junk is
// counted as not STUN and the test fails.
func TestSTUNFilter(t *testing.T) {
	req := stun.Request(stun.NewTxID())
	withType := func(typ uint16) []byte {
		b := slices.Clone(stun.Request(stun.NewTxID()))
		binary.BigEndian.PutUint16(b, typ)
		return b
	}
	rng := rand.New(rand.NewPCG(27, 27))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	geneve := func(n int) []byte { // version 0, protocol disco, a VNI, garbage
		b := random(max(n, 8))
		b[0], b[1], b[2], b[3] = 0, 0x01, 0x7A, 0x11
		return b[:n]
	}
	dropped := map[string][]byte{
		"random, 1 byte":                 random(1),
		"random, 40 bytes":               random(40),
		"random, 1,400 bytes":            random(1400),
		"Geneve, truncated":              geneve(5),
		"Geneve header and garbage":      geneve(120),
		"STUN header alone":              req[:20],
		"STUN binding request, 39 bytes": req[:39],
		"STUN binding response":          withType(0x0101),
		"STUN, wrong magic cookie":       append(slices.Clone(req[:4]), append([]byte{1, 2, 3, 4}, req[8:]...)...),
	}
	passed := map[string][]byte{ // reach the process, refused there
		"binding request, wrong fingerprint":  append(slices.Clone(req[:36]), 0, 0, 0, 0),
		"binding request, garbage attributes": append(slices.Clone(req[:20]), random(80)...),
	}
	for _, tc := range []struct{ listen, network, to string }{
		{":0", "udp4", "127.0.0.1"},
		{":0", "udp6", "::1"},
		{"127.0.0.1:0", "udp4", "127.0.0.1"},
		{"[::1]:0", "udp6", "::1"},
	} {
		t.Run(tc.listen+" from "+tc.to, func(t *testing.T) {
			s := serveSTUN(t, tc.listen)
			if s.filterErr != nil {
				t.Fatal(s.filterErr)
			}
			pc, err := net.ListenUDP(tc.network, &net.UDPAddr{IP: net.ParseIP(tc.to)})
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			to := netip.AddrPortFrom(netip.MustParseAddr(tc.to), s.localAddr().Port())
			var junk [][]byte
			for _, m := range [...]map[string][]byte{dropped, passed} {
				for _, b := range m {
					junk = append(junk, b)
				}
			}
			answer := junkThenRequest(t, pc, to, junk, req)
			if _, _, err := stun.ParseResponse(answer); err != nil {
				t.Fatalf("answer: %v", err)
			}
			// 32 bytes over IPv4, 44 over IPv6 (the protocol's 1.1×).
			if len(answer)*10 > len(req)*11 {
				t.Errorf("answer %d bytes to a %d-byte request", len(answer), len(req))
			}
			// The answer can arrive before the server counts it sent.
			waitFor(t, fmt.Sprintf("the request answered and %d datagrams refused as not STUN (the %d kinds of junk that cannot be a binding request dropped by the kernel)", len(passed), len(dropped)), func() bool {
				got := s.dispositions()
				return got["success"] == 1 && got["not_stun"] == float64(len(passed))
			})
		})
	}
}

// serveSTUN serves STUN on addr until the test ends.
func serveSTUN(t *testing.T, addr string) *stunServer {
	t.Helper()
	s, err := listenSTUN(addr)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.serve() }()
	t.Cleanup(func() {
		s.close()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return s
}

// junkThenRequest sends junk and then req from pc to STUN at to, and
// returns the answer: the server reads in order, so by then it has read
// (or the kernel dropped) all the junk.
func junkThenRequest(t *testing.T, pc *net.UDPConn, to netip.AddrPort, junk [][]byte, req []byte) []byte {
	t.Helper()
	for _, b := range append(slices.Clip(junk), req) {
		if _, err := pc.WriteToUDPAddrPort(b, to); err != nil {
			t.Fatalf("send %d bytes: %v", len(b), err)
		}
	}
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1500)
	n, err := pc.Read(buf)
	if err != nil {
		t.Fatalf("read the answer to a binding request: %v", err)
	}
	return buf[:n]
}

// TestSTUNAnswersABurst sends bursts of binding requests from IPv4 and
// IPv6 clients without reading in between, so that the server reads and
// answers many per batch: every request gets its own answer, with its
// transaction ID and its client's address.
func TestSTUNAnswersABurst(t *testing.T) {
	s := serveSTUN(t, ":0")
	const perClient = 100 // more than a batch
	clients := []string{"127.0.0.1", "::1", "127.0.0.1"}
	for _, ip := range clients {
		network := "udp4"
		if netip.MustParseAddr(ip).Is6() {
			network = "udp6"
		}
		pc, err := net.ListenUDP(network, &net.UDPAddr{IP: net.ParseIP(ip)})
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		if err := pc.SetReadBuffer(1 << 20); err != nil {
			t.Fatal(err)
		}
		to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(ip), s.localAddr().Port()))
		sent := map[stun.TxID]bool{}
		for range perClient {
			tx := stun.NewTxID()
			sent[tx] = true
			if _, err := pc.WriteToUDP(stun.Request(tx), to); err != nil {
				t.Fatal(err)
			}
		}
		pc.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 1500)
		for len(sent) > 0 {
			n, err := pc.Read(buf)
			if err != nil {
				t.Fatalf("client %s: %d of %d requests unanswered: %v", ip, len(sent), perClient, err)
			}
			tx, mapped, err := stun.ParseResponse(buf[:n])
			if err != nil {
				t.Fatalf("client %s: answer: %v", ip, err)
			}
			if !sent[tx] {
				t.Fatalf("client %s: an answer to a request it did not send, or a second one", ip)
			}
			delete(sent, tx)
			if want := pc.LocalAddr().(*net.UDPAddr).AddrPort(); mapped != want {
				t.Errorf("client %s: mapped address %v, want %v", ip, mapped, want)
			}
		}
	}
	want := float64(perClient * len(clients))
	waitFor(t, fmt.Sprintf("%v requests counted as answered", want), func() bool {
		return s.dispositions()["success"] == want
	})
}
