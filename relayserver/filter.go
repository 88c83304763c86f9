package relayserver

import (
	"errors"
	"fmt"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/tsrelay/tsrelay/internal/udpsock"
)

// SocketsFiltered is published on the node's event bus each time the relay
// server starts: how many of its sockets got the socket filter, and why the
// others did not.
type SocketsFiltered struct {
	// Port is the relay server's UDP port.
	Port uint16
	// Filtered counts the server's sockets (both IP families) that got
	// the filter.
	Filtered int
	// Err is why some or all sockets are unfiltered (a kernel or sandbox
	// that refuses socket filters); nil when all are filtered.
	Err error
}

// Lengths the filter checks. A socket filter sees a UDP datagram from its
// UDP header on, over IPv4 and IPv6 alike.
const (
	udpHeaderLen = 8
	// genevePrefix is Geneve's fixed header (net/packet).
	genevePrefix = 8
	// minGeneve is the shortest relayed datagram a Tailscale client
	// sends: a Geneve header and a WireGuard keepalive (a 16-byte transport
	// header and its 16-byte tag). Disco messages are longer (a 62-byte
	// header before their sealed box).
	minGeneve = genevePrefix + 32
	// stunHeaderLen is a STUN message's fixed header.
	stunHeaderLen = 20
)

// packetFilter returns a socket filter that passes only what Tailscale's
// relay server (net/udprelay, v1.102.5 and v1.104.7 alike) acts on:
//
//   - a STUN binding success response (0x0101 with the magic cookie): the
//     answers to the server's own address discovery, which it sends from
//     these sockets (netcheck.Client.ReceiveSTUNPacket parses only those);
//   - a Geneve header as Tailscale's clients write and accept it
//     (magicsock's packetLooksLike): version 0, the six reserved flag bits
//     and the reserved last byte zero, protocol 0x7A11 (disco) or 0x7A12
//     (WireGuard), with at least minGeneve bytes.
//
// Everything else (random bytes, truncated or malformed Geneve, STUN
// requests) the server would read and drop after a wake-up and a syscall
// per datagram or two; with the filter the kernel drops it before it is
// queued, and counts it in the socket's drops. What passes is still checked by the server as before
// (the VNI, the sender, the disco box).
//
// A limit worth knowing: with UDP receive offload the kernel can hand the
// socket one train of same-sized datagrams from one source address and
// port, and the filter judges the train by its first datagram. An attacker
// who forges a relayed client's address and port, and lands a datagram of
// the same size just before the client's, can make the kernel drop that
// train; the same forgery can already inject into the session, which
// WireGuard at the far end refuses.
func packetFilter() ([]bpf.RawInstruction, error) {
	const (
		magicCookie = 0x2112A442
		version     = 0xC0 // Geneve's version bits, in its first byte
		reserved    = 0x3F // Geneve's reserved flag bits, in its second byte
		// Where the jumps go, by instruction number.
		stun = 16
		pass = 18
		drop = 19
	)
	// to is the skip from instruction i to instruction t.
	to := func(i, t int) uint8 { return uint8(t - i - 1) }
	return bpf.Assemble([]bpf.Instruction{
		/* 0 */ bpf.LoadExtension{Num: bpf.ExtLen},
		/* 1 */ bpf.JumpIf{Cond: bpf.JumpLessThan, Val: udpHeaderLen + stunHeaderLen, SkipTrue: to(1, drop)},
		/* 2 */ bpf.TAX{}, // X = length
		/* 3 */ bpf.LoadAbsolute{Off: udpHeaderLen, Size: 2},
		/* 4 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x0101, SkipTrue: to(4, stun)},
		// Geneve.
		/* 5 */ bpf.TXA{},
		/* 6 */ bpf.JumpIf{Cond: bpf.JumpLessThan, Val: udpHeaderLen + minGeneve, SkipTrue: to(6, drop)},
		/* 7 */ bpf.LoadAbsolute{Off: udpHeaderLen, Size: 1},
		/* 8 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: version, SkipTrue: to(8, drop)},
		/* 9 */ bpf.LoadAbsolute{Off: udpHeaderLen + 1, Size: 1},
		/* 10 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: reserved, SkipTrue: to(10, drop)},
		/* 11 */ bpf.LoadAbsolute{Off: udpHeaderLen + 7, Size: 1},
		/* 12 */ bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 0, SkipTrue: to(12, drop)},
		/* 13 */ bpf.LoadAbsolute{Off: udpHeaderLen + 2, Size: 2},
		/* 14 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x7A11, SkipTrue: to(14, pass)},
		/* 15 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x7A12, SkipTrue: to(15, pass), SkipFalse: to(15, drop)},
		// STUN.
		/* 16 */ bpf.LoadAbsolute{Off: udpHeaderLen + 4, Size: 4},
		/* 17 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: magicCookie, SkipTrue: to(17, pass), SkipFalse: to(17, drop)},
		/* 18 */ bpf.RetConstant{Val: 1 << 16}, // pass, whole
		/* 19 */ bpf.RetConstant{Val: 0}, // drop
	})
}

// filterSockets attaches packetFilter to every UDP socket this process
// holds bound on port (the relay server's: it binds them itself and does
// not hand them out). It returns how many it filtered; the error says why
// the others are not.
func filterSockets(port uint16) (int, error) {
	insns, err := packetFilter()
	if err != nil {
		return 0, fmt.Errorf("assemble the socket filter: %w", err)
	}
	filter := make([]unix.SockFilter, len(insns))
	for i, in := range insns {
		filter[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	prog := &unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	socks, err := udpsock.List(0, int(port))
	if err != nil {
		return 0, fmt.Errorf("find the relay sockets: %w", err)
	}
	if len(socks) == 0 {
		return 0, fmt.Errorf("no UDP socket of this process is bound on port %d", port)
	}
	var errs []error
	for _, s := range socks {
		if err := attach(s, prog); err != nil {
			errs = append(errs, fmt.Errorf("socket %d (inode %d): %w", s.FD, s.Inode, err))
		}
	}
	n := len(socks) - len(errs)
	switch len(errs) {
	case 0:
		return n, nil
	case 1:
		return n, errs[0]
	}
	// A kernel that refuses one refuses them all, for the same reason.
	return n, fmt.Errorf("%d of %d sockets, the first: %w", len(errs), len(socks), errs[0])
}

// errReused says a descriptor read from /proc names another file by the
// time it is used: the socket was closed and the number reused.
var errReused = errors.New("closed and its descriptor reused since it was listed")

// attach attaches prog to s, checking before and after that s.FD is still
// the socket listed, so that a descriptor reused in between (the server
// closing its sockets on a read error, another file opened) keeps no filter
// meant for the relay.
func attach(s udpsock.Socket, prog *unix.SockFprog) error {
	same := func() bool {
		var st unix.Stat_t
		return unix.Fstat(s.FD, &st) == nil && st.Ino == s.Inode
	}
	if !same() {
		return errReused
	}
	if err := unix.SetsockoptSockFprog(s.FD, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, prog); err != nil {
		return fmt.Errorf("attach a socket filter: %w", err)
	}
	if !same() {
		unix.SetsockoptInt(s.FD, unix.SOL_SOCKET, unix.SO_DETACH_FILTER, 0)
		return errReused
	}
	return nil
}
