package tailnettest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// delayQueueLen is how many reads a delaying proxy holds in flight per
// direction; a sender that gets further ahead waits, as over a slow link.
const delayQueueLen = 1024

// delayedChunk is data read at some time, to be written delay later.
type delayedChunk struct {
	at   time.Time
	data []byte
}

// delayedCopy copies from src to dst, holding each read for delay: a
// one-way link delay in user space (tc netem is not available on the test
// machines). It returns when src or dst fails.
func delayedCopy(dst io.Writer, src io.Reader, delay time.Duration) {
	q := make(chan delayedChunk, delayQueueLen)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for c := range q {
			if d := time.Until(c.at.Add(delay)); d > 0 {
				time.Sleep(d) // the emulated link delay, not synchronisation
			}
			if _, err := dst.Write(c.data); err != nil {
				for range q { // drain so the reader can finish
				}
				return
			}
		}
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			q <- delayedChunk{at: time.Now(), data: append([]byte(nil), buf[:n]...)}
		}
		if err != nil {
			break
		}
	}
	close(q)
	<-done
}

// DelayTCP is a TCP proxy to a target that delays each direction: an
// "off-site" server on loopback.
type DelayTCP struct {
	// Addr is where clients connect.
	Addr netip.AddrPort

	ln     net.Listener
	target string
	delay  time.Duration
	mu     sync.Mutex
	conns  map[net.Conn]bool
	closed bool
	wg     sync.WaitGroup
}

// StartDelayTCP listens on listen and forwards connections to target,
// adding delay in each direction (so 2×delay to every round trip).
func StartDelayTCP(listen string, target netip.AddrPort, delay time.Duration) (*DelayTCP, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("delaying TCP proxy: listen on %s: %w", listen, err)
	}
	p := &DelayTCP{Addr: ln.Addr().(*net.TCPAddr).AddrPort(), ln: ln, target: target.String(), delay: delay, conns: map[net.Conn]bool{}}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

func (p *DelayTCP) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		if !p.track(c, up) {
			return
		}
		p.wg.Add(2)
		go func() { defer p.wg.Done(); delayedCopy(up, c, p.delay); up.Close(); c.Close() }()
		go func() { defer p.wg.Done(); delayedCopy(c, up, p.delay); up.Close(); c.Close() }()
	}
}

// track remembers conns for Close; it closes them and reports false if the
// proxy is closing.
func (p *DelayTCP) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		for _, c := range conns {
			c.Close()
		}
		return false
	}
	for _, c := range conns {
		p.conns[c] = true
	}
	return true
}

// Close stops the proxy, cuts its connections and waits for its goroutines.
func (p *DelayTCP) Close() error {
	err := p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

// DelayUDP is a UDP port forward (see PortForward) that delays each
// datagram in each direction.
type DelayUDP struct {
	// Addr is where clients send.
	Addr netip.AddrPort

	pc     *net.UDPConn
	target netip.AddrPort
	delay  time.Duration

	mu       sync.Mutex
	closed   bool
	upstream map[netip.AddrPort]*net.UDPConn
	wg       sync.WaitGroup
}

// StartDelayUDP listens on listen and forwards datagrams to target and
// replies back, each delay late.
func StartDelayUDP(listen string, target netip.AddrPort, delay time.Duration) (*DelayUDP, error) {
	la, err := net.ResolveUDPAddr("udp", listen)
	if err != nil {
		return nil, fmt.Errorf("delaying UDP proxy: %w", err)
	}
	pc, err := net.ListenUDP("udp", la)
	if err != nil {
		return nil, fmt.Errorf("delaying UDP proxy: listen on %s: %w", listen, err)
	}
	p := &DelayUDP{Addr: pc.LocalAddr().(*net.UDPAddr).AddrPort(), pc: pc, target: target, delay: delay, upstream: map[netip.AddrPort]*net.UDPConn{}}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

func (p *DelayUDP) serve() {
	defer p.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, client, err := p.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return // closed
		}
		up, err := p.upstreamFor(client)
		if err != nil {
			continue
		}
		pkt := append([]byte(nil), buf[:n]...)
		time.AfterFunc(p.delay, func() { up.Write(pkt) })
	}
}

func (p *DelayUDP) upstreamFor(client netip.AddrPort) (*net.UDPConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if up, ok := p.upstream[client]; ok {
		return up, nil
	}
	if p.closed {
		return nil, errors.New("closed")
	}
	up, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(p.target))
	if err != nil {
		return nil, err
	}
	p.upstream[client] = up
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 65535)
		for {
			n, err := up.Read(buf)
			if err != nil {
				return // closed
			}
			pkt := append([]byte(nil), buf[:n]...)
			time.AfterFunc(p.delay, func() { p.pc.WriteToUDPAddrPort(pkt, client) })
		}
	}()
	return up, nil
}

// Close stops the proxy and waits for its goroutines.
func (p *DelayUDP) Close() error {
	err := p.pc.Close()
	p.mu.Lock()
	p.closed = true
	for _, up := range p.upstream {
		up.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}
