package tailnettest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
)

// PortForward is a UDP port forward like a home router's or a load
// balancer's: datagrams sent to Addr go to the target, and replies come back
// from Addr. Each client gets its own upstream socket, so the target sees
// distinct clients as distinct addresses, as it would behind NAT.
type PortForward struct {
	// Addr is the forward's public side.
	Addr netip.AddrPort

	ctx    context.Context
	cancel context.CancelFunc
	pc     net.PacketConn
	target netip.AddrPort
	allow  func(client netip.AddrPort) bool // nil allows every client

	mu       sync.Mutex
	upstream map[netip.AddrPort]net.PacketConn // by client address
	wg       sync.WaitGroup
}

// StartPortForward listens on listen (e.g. "127.0.0.1:0") and forwards to
// target until Close.
func StartPortForward(listen string, target netip.AddrPort) (*PortForward, error) {
	return StartPortForwardFor(listen, target, nil)
}

// StartPortForwardFor is StartPortForward that forwards only the datagrams
// of clients allow reports true for and drops the others, like a firewall
// in front of the router; nil allows every client. Tests use it to give
// each laptop a different way to the relay.
func StartPortForwardFor(listen string, target netip.AddrPort, allow func(client netip.AddrPort) bool) (*PortForward, error) {
	pc, err := net.ListenPacket("udp", listen)
	if err != nil {
		return nil, fmt.Errorf("port forward: listen on %s: %w", listen, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &PortForward{
		Addr:     pc.LocalAddr().(*net.UDPAddr).AddrPort(),
		ctx:      ctx,
		cancel:   cancel,
		pc:       pc,
		target:   target,
		allow:    allow,
		upstream: make(map[netip.AddrPort]net.PacketConn),
	}
	f.wg.Add(1)
	go f.serve()
	return f, nil
}

// serve copies client datagrams to the target.
func (f *PortForward) serve() {
	defer f.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, from, err := f.pc.ReadFrom(buf)
		if err != nil {
			return // closed
		}
		client := from.(*net.UDPAddr).AddrPort()
		if f.allow != nil && !f.allow(client) {
			continue
		}
		up, err := f.upstreamFor(client)
		if err != nil {
			continue // like a router out of NAT entries: drop
		}
		up.WriteTo(buf[:n], net.UDPAddrFromAddrPort(f.target))
	}
}

// upstreamFor returns the client's upstream socket, creating it and its
// reply loop on first use.
func (f *PortForward) upstreamFor(client netip.AddrPort) (net.PacketConn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if up, ok := f.upstream[client]; ok {
		return up, nil
	}
	if f.ctx.Err() != nil {
		return nil, f.ctx.Err()
	}
	up, err := net.ListenPacket("udp", net.JoinHostPort(f.Addr.Addr().String(), "0"))
	if err != nil {
		return nil, err
	}
	f.upstream[client] = up
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		buf := make([]byte, 65535)
		for {
			n, _, err := up.ReadFrom(buf)
			if err != nil {
				return // closed
			}
			f.pc.WriteTo(buf[:n], net.UDPAddrFromAddrPort(client))
		}
	}()
	return up, nil
}

// Close stops forwarding and waits for its goroutines.
func (f *PortForward) Close() error {
	f.cancel()
	err := f.pc.Close()
	f.mu.Lock()
	for _, up := range f.upstream {
		up.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
	return err
}
