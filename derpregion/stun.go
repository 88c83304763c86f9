package derpregion

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"tailscale.com/net/stun"
)

// stunServer answers STUN binding requests as Tailscale's net/stunserver
// does, with one difference that matters on a public address: an IPv4
// client reaching the dual-stack socket arrives as an IPv4-mapped IPv6
// address, and net/stunserver (v1.102.5) answers it as IPv6, 44 bytes to
// its 40-byte request: a reflector that amplifies 1.1× to any address a
// stranger forges. Answered as the IPv4 address it is, the answer is 32
// bytes (0.8×). An IPv6 client's answer is 44 bytes whatever one does;
// that is the protocol as Tailscale's clients speak it (a request carries
// only its software attribute and fingerprint), and refusing it would
// break their IPv6 netcheck.
//
// Only well-formed binding requests with Tailscale's software attribute
// and a valid fingerprint are answered (stun.ParseBindingRequest); all
// else is dropped and counted.
type stunServer struct {
	pc *net.UDPConn

	success, notSTUN, readError, writeError atomic.Uint64
}

// listenSTUN binds the STUN socket on addr (udp, dual-stack for a
// wildcard address).
func listenSTUN(addr string) (*stunServer, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", addr, err)
	}
	pc, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, err
	}
	return &stunServer{pc: pc}, nil
}

// localAddr is the address the socket is bound to.
func (s *stunServer) localAddr() netip.AddrPort { return s.pc.LocalAddr().(*net.UDPAddr).AddrPort() }

// close closes the socket, which ends serve.
func (s *stunServer) close() { s.pc.Close() }

// serve answers requests until the socket is closed, then returns nil.
func (s *stunServer) serve() error {
	// A request is 40 bytes; a longer datagram is not one, and is cut
	// here and then fails its fingerprint check.
	var buf [1500]byte
	for {
		n, from, err := s.pc.ReadFromUDPAddrPort(buf[:])
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			s.readError.Add(1)
			time.Sleep(10 * time.Millisecond) // not a busy loop on a persistent error
			continue
		}
		txid, err := stun.ParseBindingRequest(buf[:n])
		if err != nil {
			s.notSTUN.Add(1)
			continue
		}
		to := netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if _, err := s.pc.WriteToUDPAddrPort(stun.Response(txid, to), from); err != nil {
			s.writeError.Add(1)
			continue
		}
		s.success.Add(1)
	}
}

// dispositions are the request counts by outcome, as net/stunserver names
// them.
func (s *stunServer) dispositions() map[string]float64 {
	return map[string]float64{
		"success":     float64(s.success.Load()),
		"not_stun":    float64(s.notSTUN.Load()),
		"read_error":  float64(s.readError.Load()),
		"write_error": float64(s.writeError.Load()),
	}
}
