package derpregion

import (
	"net"
	"net/netip"
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
	s, err := listenSTUN(":0")
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
	to := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), s.localAddr().Port())
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()

	for _, junk := range [][]byte{
		[]byte("not stun at all"),
		stun.Request(stun.NewTxID())[:20],                     // a header, no attributes
		append(stun.Request(stun.NewTxID())[:36], 0, 0, 0, 0), // a wrong fingerprint
	} {
		if _, err := pc.WriteToUDPAddrPort(junk, to); err != nil {
			t.Fatal(err)
		}
	}
	req := stun.Request(stun.NewTxID())
	if _, err := pc.WriteToUDPAddrPort(req, to); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1500)
	n, err := pc.Read(buf)
	if err != nil {
		t.Fatalf("read the answer: %v", err)
	}
	if n > len(req) {
		t.Errorf("answer %d bytes to a %d-byte request: amplifies %.2f×", n, len(req), float64(n)/float64(len(req)))
	}
	_, mapped, err := stun.ParseResponse(buf[:n])
	if err != nil {
		t.Fatal(err)
	}
	if want := pc.LocalAddr().(*net.UDPAddr).AddrPort(); mapped != want {
		t.Errorf("mapped address %v, want %v", mapped, want)
	}
	// Only the request was answered: the junk came first, and nothing
	// else arrives.
	pc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := pc.Read(buf); err == nil {
		t.Errorf("a second answer (%d bytes): junk was answered", n)
	}
	waitFor(t, "the junk counted as not STUN and the request as answered", func() bool {
		got := s.dispositions()
		return got["success"] == 1 && got["not_stun"] == 3
	})
}
