package derpregion

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/ipn"
	"tailscale.com/ipn/store"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// The tests below attack a real DERP server over real loopback sockets,
// one limit each; each fails if its limit is removed (the comment on each
// says how). They assert bounds (closed before another timer could have
// closed it), not durations.

// guarded is a Server started for a guard test, with its registry.
type guarded struct {
	s    *Server
	cert *Cert
	reg  *prometheus.Registry
	logs *lineLog
}

// serveGuarded starts a Server on 127.0.0.1 with cfg's limits and lim's
// timeouts (zero fields: the defaults), and stops it in t.Cleanup.
func serveGuarded(t *testing.T, node Node, cfg ServerConfig, lim limits) *guarded {
	t.Helper()
	st, err := store.NewFileStore(t.Logf, filepath.Join(t.TempDir(), "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := SelfSigned(st, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	logs := &lineLog{t: t}
	cfg.DERPAddr, cfg.STUNAddr, cfg.TLS, cfg.Node = "127.0.0.1:0", "127.0.0.1:0", cert, node
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	s, err := Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	def := defaultLimits()
	if lim.readHeader == 0 {
		lim.readHeader = def.readHeader
	}
	if lim.idle == 0 {
		lim.idle = def.idle
	}
	if lim.admitWithin == 0 {
		lim.admitWithin = def.admitWithin
	}
	if lim.logInterval == 0 {
		lim.logInterval = def.logInterval
	}
	s.lim = lim // before Serve: the listener and the server read it
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	waitFor(t, "the server to serve", s.Serving)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(s, nil, DefaultRegionCode, slog.Default()))
	return &guarded{s: s, cert: cert, reg: reg, logs: logs}
}

// lineLog keeps the server's log lines and echoes them to t.Log.
type lineLog struct {
	t     *testing.T
	mu    sync.Mutex
	lines []string
}

func (l *lineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	l.lines = append(l.lines, strings.TrimSpace(string(p)))
	l.mu.Unlock()
	l.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (l *lineLog) matching(substr string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, s := range l.lines {
		if strings.Contains(s, substr) {
			out = append(out, s)
		}
	}
	return out
}

// refusedFor is tsrelay_derp_connections_refused_total{reason}.
func (g *guarded) refusedFor(t *testing.T, reason string) float64 {
	t.Helper()
	mfs, err := g.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "tsrelay_derp_connections_refused_total" {
			continue
		}
		for _, m := range mf.Metric {
			for _, lp := range m.Label {
				if lp.GetName() == "reason" && lp.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// dialFrom opens a TCP connection to addr from src (any 127/8 address
// works on Linux loopback), so tests can play many sources.
func dialFrom(t *testing.T, src netip.Addr, addr netip.AddrPort) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		t.Fatalf("dial %v from %v: %v", addr, src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// tlsFrom is dialFrom with a finished TLS handshake.
func tlsFrom(t *testing.T, src netip.Addr, addr netip.AddrPort) *tls.Conn {
	t.Helper()
	tc := tls.Client(dialFrom(t, src, addr), &tls.Config{InsecureSkipVerify: true})
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake from %v: %v", src, err)
	}
	tc.SetDeadline(time.Time{})
	return tc
}

// src returns the loopback address 127.0.<i/250>.<i%250+1>.
func src(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 0, byte(i / 250), byte(i%250 + 1)})
}

// closedWithin reads c until the server closes it, and fails if that has
// not happened within d.
func closedWithin(t *testing.T, c net.Conn, d time.Duration, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Errorf("%s: still open after %v, want closed by the server", what, d)
	}
}

func TestOversizedHeaderRefused(t *testing.T) {
	t.Parallel()
	g := serveGuarded(t, &stubNode{state: ipn.Running}, ServerConfig{}, limits{})
	c := tlsFrom(t, src(0), g.s.DERPAddr())
	// 64 KiB of header, never finished: with net/http's default 1 MiB
	// limit the server keeps reading and answers nothing until the
	// header timeout (the test fails without MaxHeaderBytes).
	go func() {
		fmt.Fprintf(c, "GET /derp HTTP/1.1\r\nHost: derp\r\nUpgrade: DERP\r\nX-Pad: %s", strings.Repeat("a", 64<<10))
	}()
	c.SetReadDeadline(time.Now().Add(derpReadHeaderTimeout - time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("64 KiB header: %v, want 431 before the header timeout", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("64 KiB header: %s, want 431", resp.Status)
	}
}

func TestTLSHandshakeDeadline(t *testing.T) {
	t.Parallel()
	lim := limits{readHeader: 3 * time.Second, admitWithin: 30 * time.Second}
	g := serveGuarded(t, &stubNode{state: ipn.Running}, ServerConfig{}, lim)
	// TCP that never starts TLS. Without ReadHeaderTimeout (which
	// net/http also applies to the handshake) only admitWithin would
	// close it, far later.
	c := dialFrom(t, src(0), g.s.DERPAddr())
	closedWithin(t, c, lim.admitWithin/2, "TCP connection without a TLS handshake")
	// Half a request header: the same timeout.
	tc := tlsFrom(t, src(0), g.s.DERPAddr())
	io.WriteString(tc, "GET /generate_204 HTTP/1.1\r\nHost: derp\r\n")
	closedWithin(t, tc, lim.admitWithin/2, "unfinished request header")
}

func TestIdleKeepAliveClosed(t *testing.T) {
	t.Parallel()
	lim := limits{idle: time.Second, admitWithin: 30 * time.Second}
	g := serveGuarded(t, &stubNode{state: ipn.Running}, ServerConfig{}, lim)
	c := tlsFrom(t, src(0), g.s.DERPAddr())
	br := bufio.NewReader(c)
	io.WriteString(c, "GET /generate_204 HTTP/1.1\r\nHost: derp\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("/generate_204: %s", resp.Status)
	}
	// Without IdleTimeout the keep-alive would wait for admitWithin.
	closedWithin(t, c, lim.admitWithin/2, "idle keep-alive after /generate_204")
}

func TestKeepAlivesCannotHoldASlot(t *testing.T) {
	t.Parallel()
	lim := limits{idle: 5 * time.Second, admitWithin: 4 * time.Second}
	g := serveGuarded(t, &stubNode{state: ipn.Running}, ServerConfig{}, lim)
	c := tlsFrom(t, src(0), g.s.DERPAddr())
	br := bufio.NewReader(c)
	// A request every 200 ms, each within the idle timeout: only
	// admitWithin ends this connection (without it, never).
	deadline := time.Now().Add(lim.admitWithin + 10*time.Second)
	for time.Now().Before(deadline) {
		if _, err := io.WriteString(c, "GET /derp/probe HTTP/1.1\r\nHost: derp\r\n\r\n"); err != nil {
			break
		}
		c.SetReadDeadline(deadline)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			break
		}
		resp.Body.Close()
		time.Sleep(200 * time.Millisecond) // the attacker's pace, not synchronisation
	}
	if time.Now().After(deadline) {
		t.Errorf("keep-alive requests every 200 ms: connection still open after %v, want closed after admitWithin (%v)", lim.admitWithin+10*time.Second, lim.admitWithin)
	}
	if got := g.refusedFor(t, reasonAdmitTimeout); got != 1 {
		t.Errorf("refused{admit_timeout} = %v, want 1", got)
	}
}

func TestUpgradedWithoutClientInfo(t *testing.T) {
	t.Parallel()
	lim := limits{admitWithin: 4 * time.Second}
	g := serveGuarded(t, &stubNode{state: ipn.Running}, ServerConfig{}, lim)
	c := tlsFrom(t, src(0), g.s.DERPAddr())
	br := bufio.NewReader(c)
	io.WriteString(c, "GET /derp HTTP/1.1\r\nHost: derp\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %s", resp.Status)
	}
	// The server key frame, then nothing from us. derpserver's own
	// deadline for the ClientInfo is 10 s from the upgrade; admitWithin
	// (4 s from the accept here) must close it before.
	if _, _, err := derp.ReadFrameHeader(br); err != nil {
		t.Fatalf("server key frame: %v", err)
	}
	closedWithin(t, c, 8*time.Second, "upgraded connection without a ClientInfo")
}

// memberClient connects priv to the server as Tailscale's DERP client does,
// from 127.0.0.1, waits for admission, and closes it in t.Cleanup.
func memberClient(t *testing.T, g *guarded, priv key.NodePrivate) *derphttp.Client {
	t.Helper()
	r := regionFor(g.s, g.cert, g.cert.CertName())
	c := derphttp.NewRegionClient(priv, logger.WithPrefix(t.Logf, "derp client: "), netmon.NewStatic(), func() *tailcfg.DERPRegion { return r })
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("member %v: connect: %v", priv.Public().ShortString(), err)
	}
	m, err := recvWithin(c, 10*time.Second)
	if err != nil {
		t.Fatalf("member %v: %v", priv.Public().ShortString(), err)
	}
	if _, ok := m.(derp.ServerInfoMessage); !ok {
		t.Fatalf("member %v: first message %T, want the server info", priv.Public().ShortString(), m)
	}
	return c
}

// recvWithin is c.Recv with a deadline.
func recvWithin(c *derphttp.Client, d time.Duration) (derp.ReceivedMessage, error) {
	type result struct {
		m   derp.ReceivedMessage
		err error
	}
	rc := make(chan result, 1)
	go func() {
		m, err := c.Recv()
		rc <- result{m, err}
	}()
	select {
	case r := <-rc:
		return r.m, r.err
	case <-time.After(d):
		c.Close()
		return nil, fmt.Errorf("nothing received in %v", d)
	}
}

// relays checks that a packet from a to b arrives: both are admitted and
// connected.
func relays(t *testing.T, a *derphttp.Client, b *derphttp.Client, bKey key.NodePublic, what string) {
	t.Helper()
	payload := []byte("hello " + what)
	if err := a.Send(bKey, payload); err != nil {
		t.Errorf("%s: send: %v", what, err)
		return
	}
	for {
		m, err := recvWithin(b, 10*time.Second)
		if err != nil {
			t.Errorf("%s: receive: %v", what, err)
			return
		}
		if p, ok := m.(derp.ReceivedPacket); ok && string(p.Data) == string(payload) {
			return
		}
	}
}

func TestAdmittedOutliveTimeouts(t *testing.T) {
	t.Parallel()
	a, b := key.NewNode(), key.NewNode()
	node := &stubNode{state: ipn.Running, known: map[key.NodePublic]bool{a.Public(): true, b.Public(): true}}
	lim := limits{readHeader: 2 * time.Second, idle: 2 * time.Second, admitWithin: 4 * time.Second}
	g := serveGuarded(t, node, ServerConfig{}, lim)
	ca, cb := memberClient(t, g, a), memberClient(t, g, b)
	// Past every timeout of the port: admitted connections are exempt
	// (hijacked, so net/http's timeouts are gone; admission stopped
	// admitWithin's timer). Without the admission detection, admitWithin
	// would close them.
	time.Sleep(2 * lim.admitWithin) // the time that must pass, not synchronisation
	relays(t, ca, cb, b.Public(), "a to b after 2 × admitWithin")
	if got := g.refusedFor(t, reasonAdmitTimeout); got != 0 {
		t.Errorf("refused{admit_timeout} = %v, want 0", got)
	}
}

func TestUnadmittedCapReservesRoomForAdmitted(t *testing.T) {
	t.Parallel()
	const capN = 8
	members := make([]key.NodePrivate, capN+4)
	known := map[key.NodePublic]bool{}
	for i := range members {
		members[i] = key.NewNode()
		known[members[i].Public()] = true
	}
	g := serveGuarded(t, &stubNode{state: ipn.Running, known: known}, ServerConfig{MaxUnadmitted: capN}, limits{})

	// More members than the cap, one after another, all stay connected,
	// and none counts as unadmitted once in (without the release on
	// admission, the gauge stays at the cap).
	clients := make([]*derphttp.Client, len(members)-1)
	for i := range clients {
		clients[i] = memberClient(t, g, members[i])
	}
	waitFor(t, "admitted members to leave the unadmitted count", func() bool { return g.s.derpLn.unadmittedNow() == 0 })

	// Strangers hold every unadmitted slot: TCP connections that never
	// start TLS, from capN sources.
	strangers := make([]net.Conn, capN)
	for i := range strangers {
		strangers[i] = dialFrom(t, src(10+i), g.s.DERPAddr())
		waitFor(t, "the stranger to be counted", func() bool { return g.s.derpLn.unadmittedNow() == i+1 })
	}
	// A new member still gets in: its connection closes the oldest
	// stranger's (without the eviction, it is closed at once, and the
	// member is refused until the strangers time out).
	last := memberClient(t, g, members[len(members)-1])
	closedWithin(t, strangers[0], derpReadHeaderTimeout-time.Second, "the oldest stranger, when a new connection needs its room")
	if got := g.refusedFor(t, reasonUnadmittedCap); got < 1 {
		t.Errorf("refused{unadmitted_cap} = %v, want ≥ 1", got)
	}
	if got := g.s.derpLn.unadmittedNow(); got > capN {
		t.Errorf("unadmitted = %d, over the cap %d", got, capN)
	}
	// The admitted are untouched.
	relays(t, clients[0], last, members[len(members)-1].Public(), "first to last member while strangers fill the cap")
}

func TestSourceCap(t *testing.T) {
	t.Parallel()
	g := serveGuarded(t, &stubNode{state: ipn.Running}, ServerConfig{}, limits{})
	for range maxUnadmittedPerSource {
		dialFrom(t, src(0), g.s.DERPAddr())
	}
	waitFor(t, "one source to hold its share", func() bool { return g.s.derpLn.unadmittedNow() == maxUnadmittedPerSource })
	// Without the per-source cap the next one would be held until the
	// handshake timeout, like the others.
	over := dialFrom(t, src(0), g.s.DERPAddr())
	closedWithin(t, over, derpReadHeaderTimeout-time.Second, "connection over its source's cap")
	if got := g.refusedFor(t, reasonSourceCap); got != 1 {
		t.Errorf("refused{source_cap} = %v, want 1", got)
	}
	// Another source still gets in: TLS works for it.
	tlsFrom(t, src(1), g.s.DERPAddr())
}

func TestAcceptRate(t *testing.T) {
	t.Parallel()
	// 0.1 a second: a burst of 1, the next token in 10 s.
	g := serveGuarded(t, &stubNode{state: ipn.Running}, ServerConfig{AcceptRate: 0.1}, limits{})
	tlsFrom(t, src(0), g.s.DERPAddr())
	// Without the limit this one would complete its handshake.
	over := dialFrom(t, src(1), g.s.DERPAddr())
	closedWithin(t, over, derpReadHeaderTimeout-time.Second, "connection over the accept rate")
	if got := g.refusedFor(t, reasonAcceptRate); got != 1 {
		t.Errorf("refused{accept_rate} = %v, want 1", got)
	}
}

func TestRefusalsLoggedOncePerInterval(t *testing.T) {
	t.Parallel()
	const interval = 500 * time.Millisecond
	g := serveGuarded(t, &stubNode{state: ipn.Running}, ServerConfig{}, limits{logInterval: interval})
	r := regionFor(g.s, g.cert, g.cert.CertName())
	const strangers = 20
	start := time.Now()
	for range strangers {
		if err := connect(t, r, key.NewNode()); err == nil {
			t.Fatal("stranger admitted")
		}
	}
	// The count is logged, not each stranger: wait for the lines that
	// cover them, then check there are no more than one per interval.
	total := func() (n int, lines int) {
		ls := g.logs.matching("DERP connections refused")
		for _, l := range ls {
			m := regexp.MustCompile(`not_member=(\d+)`).FindStringSubmatch(l)
			if m != nil {
				v, _ := strconv.Atoi(m[1])
				n += v
			}
		}
		return n, len(ls)
	}
	waitFor(t, "the refusal count in the log", func() bool { n, _ := total(); return n == strangers })
	elapsed := time.Since(start)
	_, lines := total()
	if maxLines := int(elapsed/interval) + 1; lines > maxLines {
		t.Errorf("%d refusal lines in %v, want at most one per %v (%d)", lines, elapsed, interval, maxLines)
	}
	if got := len(g.logs.matching("DERP client refused")); got != 0 {
		t.Errorf("%d per-client refusal lines at Info, want 0", got)
	}
}
