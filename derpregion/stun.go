package derpregion

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"golang.org/x/net/bpf"
	"golang.org/x/net/ipv6"
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
// No request shape gets more: stun.ParseBindingRequest accepts nothing
// shorter than 40 bytes (a 20-byte header, the 12-byte software
// attribute and the 8-byte fingerprint it requires), and every answer is
// 32 bytes (IPv4) or 44 (IPv6), whatever the request carried.
//
// Only well-formed binding requests with Tailscale's software attribute
// and a valid fingerprint are answered (stun.ParseBindingRequest); all
// else is dropped and counted. What cannot be one (bindingRequestFilter)
// is dropped by the kernel before it wakes the process, uncounted.
type stunServer struct {
	pc        *net.UDPConn
	filterErr error // why bindingRequestFilter is not attached, if it is not

	success, notSTUN, readError, writeError atomic.Uint64
}

// listenSTUN binds the STUN socket on addr (udp, dual-stack for a
// wildcard address) and attaches bindingRequestFilter. A kernel that
// refuses the filter (a sandbox such as gVisor may) leaves the socket
// unfiltered and the error in the server's filterErr: the server works
// without it, at a higher cost per junk packet.
func listenSTUN(addr string) (*stunServer, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", addr, err)
	}
	pc, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, err
	}
	// SO_ATTACH_FILTER is SOL_SOCKET: the ipv6 package's setter serves an
	// IPv4 socket too.
	filter, err := bindingRequestFilter()
	if err == nil {
		err = ipv6.NewPacketConn(pc).SetBPF(filter)
	}
	s := &stunServer{pc: pc}
	if err != nil {
		s.filterErr = fmt.Errorf("attach a socket filter to the STUN socket: %w", err)
	}
	return s, nil
}

// minBindingRequest is the shortest datagram stun.ParseBindingRequest
// accepts: the header, the software attribute ("tailnode") and the
// fingerprint, both of which it requires (Tailscale's netcheck sends
// exactly this, stun.Request, over IPv4 and IPv6 alike).
const minBindingRequest = 20 + 4 + 8 + 8

// bindingRequestFilter returns a socket filter that passes only datagrams that
// could be binding requests stun.ParseBindingRequest accepts: at least
// minBindingRequest bytes, the binding request type (0x0001) and the
// magic cookie, which it checks first (stun.Is). Everything else (random
// bytes, Geneve, STUN of another type) is dropped in the kernel: a junk
// flood at the STUN port then costs the process nothing for most of it
// (issue 27: a paced flood of the bench's junk took a third less CPU).
// A socket filter sees a UDP datagram from its UDP header (8 bytes) on,
// over IPv4 and IPv6 alike.
func bindingRequestFilter() ([]bpf.RawInstruction, error) {
	return bpf.Assemble([]bpf.Instruction{
		bpf.LoadExtension{Num: bpf.ExtLen},
		bpf.JumpIf{Cond: bpf.JumpLessThan, Val: 8 + minBindingRequest, SkipTrue: 5},
		bpf.LoadAbsolute{Off: 8, Size: 2}, // message type
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 0x0001, SkipTrue: 3},
		bpf.LoadAbsolute{Off: 8 + 4, Size: 4}, // magic cookie
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 0x2112A442, SkipTrue: 1},
		bpf.RetConstant{Val: 1 << 16}, // pass, whole
		bpf.RetConstant{Val: 0},       // drop
	})
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
