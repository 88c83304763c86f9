package derpregion

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/tsrelay/tsrelay/internal/admitq"
)

// The DERP port is on a public address: anyone reaches it before the
// tailnet admission check. What a stranger can make it hold is bounded
// here, before TLS, and by the http.Server's limits (Serve):
//
//   - connections not yet admitted (TLS handshake, HTTP request, DERP
//     handshake and admission check) are capped per source address
//     (maxUnadmittedPerSource: a connection over it is closed at once) and
//     in total (ServerConfig.MaxUnadmitted): with the total reached, a new
//     connection closes the oldest unadmitted one, which has had the
//     longest to finish, so strangers holding every slot cannot keep a
//     new member out (each connection still gets at least
//     MaxUnadmitted/AcceptRate seconds, 2.56 s by default);
//   - new connections are rate-limited before TLS (ServerConfig.AcceptRate), as
//     Tailscale's cmd/derper does with --accept-connection-limit: over the
//     rate, a connection is closed at once rather than left in the kernel's
//     queue, so a client learns at once and retries with its backoff;
//   - a connection not admitted within admitWithin of its accept is closed,
//     whatever it is doing (half a TLS handshake, keep-alive requests to
//     /generate_204, an upgraded connection that never sends its
//     ClientInfo).
//
// An admitted connection (a tailnet member or a mesh peer) leaves the
// unadmitted count and these limits: the abuse of strangers never closes
// it or takes its place.
const (
	// admitWithin bounds a connection's life until admission. A DERP
	// client needs about four round trips (TCP, TLS 1.3, the upgrade,
	// its ClientInfo) and the admission check (at most admitTimeout);
	// derpserver itself gives the ClientInfo 10 s after the upgrade.
	admitWithin = 10 * time.Second

	// maxUnadmittedPerSource caps the unadmitted connections of one source
	// address (an IPv6 /64), so that one host cannot hold the whole
	// MaxUnadmitted: a real client has one connection in its handshake at a
	// time, and a NAT with many clients behind it rarely has more than a
	// few at once, each for a few round trips. The Service's
	// externalTrafficPolicy: Local keeps the sources' own addresses.
	maxUnadmittedPerSource = 16

	// refusalLogInterval is how often refused connections are logged, as
	// one line with their counts, so a flood of them is no flood of logs.
	refusalLogInterval = time.Minute
)

// Defaults for ServerConfig.MaxUnadmitted and ServerConfig.AcceptRate,
// chosen from make bench's DERP-port abuse rows (bench/README.md, results
// in bench/results): with the cap full, an unadmitted connection costs the
// relay 30-65 KiB (TCP without TLS the least, an upgraded one waiting for
// its ClientInfo the most); 512 of them went over the 32 MiB goal, so 256
// (about 17 MiB at most). A real client is unadmitted for a few round
// trips, so even a region's reconnect storm at the accept rate needs a few
// dozen. 100 connections a second let a region's clients reconnect after a
// restart at that rate (a burst of AcceptBurstSeconds worth at once) and
// cost a small part of a core in TLS handshakes.
const (
	DefaultMaxUnadmitted = 256
	DefaultAcceptRate    = 100
	// AcceptBurstSeconds: the accept limiter's burst is this many
	// seconds of AcceptRate.
	AcceptBurstSeconds = 2
)

// Reasons a connection was refused or closed before admission, the
// "reason" label of tsrelay_derp_connections_refused_total.
const (
	reasonAcceptRate    = "accept_rate"    // over ServerConfig.AcceptRate
	reasonUnadmittedCap = "unadmitted_cap" // the oldest waiting, closed for a new one over ServerConfig.MaxUnadmitted
	reasonSourceCap     = "source_cap"     // maxUnadmittedPerSource from this source already waiting
	reasonAdmitTimeout  = "admit_timeout"  // not admitted within admitWithin
	reasonNotMember     = "not_member"     // refused by the tailnet admission check
	numRefusalReasons   = 5
)

var refusalReasons = [numRefusalReasons]string{reasonAcceptRate, reasonUnadmittedCap, reasonSourceCap, reasonAdmitTimeout, reasonNotMember}

// refusals counts refused connections by reason.
type refusals struct {
	n [numRefusalReasons]atomic.Uint64
}

func (r *refusals) add(reason string) {
	for i, s := range refusalReasons {
		if s == reason {
			r.n[i].Add(1)
			return
		}
	}
}

// snapshot returns the counts by reason.
func (r *refusals) snapshot() map[string]uint64 {
	m := make(map[string]uint64, numRefusalReasons)
	for i, s := range refusalReasons {
		m[s] = r.n[i].Load()
	}
	return m
}

// logEvery logs, once per interval, how many connections were refused
// since the last line and why, until ctx is done; nothing when none were.
func (r *refusals) logEvery(ctx context.Context, interval time.Duration, logger *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	last := r.snapshot()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := r.snapshot()
		var attrs []any
		var total uint64
		for _, reason := range refusalReasons {
			if d := now[reason] - last[reason]; d > 0 {
				attrs = append(attrs, reason, d)
				total += d
			}
		}
		last = now
		if total > 0 {
			logger.Info("DERP connections refused", append([]any{"count", total, "in", interval.String()}, attrs...)...)
		}
	}
}

// guardListener applies the limits above to a DERP listener. It sits
// under TLS: net/http's server needs to see the *tls.Conn.
type guardListener struct {
	net.Listener
	lim        *rate.Limiter
	refused    *refusals
	limits     *limits       // admitWithin
	unadmitted *admitq.Queue // connections not admitted, oldest first

	mu       sync.Mutex
	bySource map[netip.Prefix]int // unadmitted connections by source
}

func newGuardListener(ln net.Listener, maxUnadmitted int, acceptRate float64, refused *refusals, lim *limits) *guardListener {
	burst := max(1, int(acceptRate*AcceptBurstSeconds))
	return &guardListener{
		Listener:   ln,
		lim:        rate.NewLimiter(rate.Limit(acceptRate), burst),
		refused:    refused,
		limits:     lim,
		unadmitted: admitq.New(maxUnadmitted),
		bySource:   map[netip.Prefix]int{},
	}
}

// Accept returns the next connection within the limits, closing at once
// those over them.
func (g *guardListener) Accept() (net.Conn, error) {
	for {
		c, err := g.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if gc := g.take(c); gc != nil {
			return gc, nil
		}
		c.Close()
	}
}

// sourceOf is the prefix a connection's source counts against: its IPv4
// address, or its IPv6 /64 (one host commonly has a whole /64).
func sourceOf(c net.Conn) netip.Prefix {
	ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return netip.Prefix{}
	}
	a := ap.Addr().Unmap()
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return p
}

// take counts c as unadmitted and wraps it, or returns nil (the refusal
// counted) when a limit says no. The per-source cap comes first, so that
// a connection refused by it costs no token of the rate; with the total
// reached, the oldest unadmitted connection is closed to make room.
func (g *guardListener) take(c net.Conn) *guardConn {
	src := sourceOf(c)
	g.mu.Lock()
	switch {
	case g.bySource[src] >= maxUnadmittedPerSource:
		g.mu.Unlock()
		g.refused.add(reasonSourceCap)
		return nil
	case !g.lim.Allow():
		g.mu.Unlock()
		g.refused.add(reasonAcceptRate)
		return nil
	}
	g.bySource[src]++
	g.mu.Unlock()
	gc := &guardConn{Conn: c, g: g, src: src}
	// Only a later take can evict gc, so its timer is set by then.
	gc.ticket = g.unadmitted.Join(gc.evict)
	gc.timer = time.AfterFunc(g.limits.admitWithin, gc.expire)
	return gc
}

// release returns c's unadmitted slot, if it still holds one.
func (g *guardListener) release(c *guardConn) {
	if c.ticket.Leave() {
		g.dropSource(c.src)
	}
}

// dropSource takes one unadmitted connection off src's count.
func (g *guardListener) dropSource(src netip.Prefix) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.bySource[src]--; g.bySource[src] <= 0 {
		delete(g.bySource, src)
	}
}

// unadmittedNow is the number of connections not yet admitted.
func (g *guardListener) unadmittedNow() int {
	return g.unadmitted.Len()
}

// guardConn states: a connection is unadmitted until derpserver trusts
// it. derpserver has no hook for that moment, but it marks it on the
// connection (derp/derpserver's accept at v1.102.5): after the upgrade it
// sets a 10 s deadline for the DERP handshake, and once the client's
// ClientInfo passed the admission check (or carried the mesh key) it
// clears the deadline ("At this point we trust the client so we don't
// time out"). net/http clears the deadline too when it hands the
// connection over (Hijack), so admission is the first cleared deadline
// after a set one, on a connection marked upgraded.
const (
	stateUnadmitted    int32 = iota // TLS and HTTP
	stateUpgraded                   // a /derp upgrade request is being served
	stateDERPHandshake              // derpserver set its handshake deadline
	stateAdmitted                   // derpserver cleared it: trusted
	stateClosed
)

// guardConn is an accepted DERP-port connection, holding an unadmitted
// slot until admitted or closed.
type guardConn struct {
	net.Conn
	g      *guardListener
	src    netip.Prefix
	timer  *time.Timer
	ticket *admitq.Ticket // its place among the unadmitted

	mu    sync.Mutex
	state int32
}

// markUpgraded notes that the connection is being upgraded to DERP.
func (c *guardConn) markUpgraded() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateUnadmitted {
		c.state = stateUpgraded
	}
}

// SetDeadline watches for derpserver's admission (see the states above).
func (c *guardConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	switch {
	case c.state == stateUpgraded && !t.IsZero():
		c.state = stateDERPHandshake
	case c.state == stateDERPHandshake && t.IsZero():
		c.state = stateAdmitted
		c.timer.Stop()
		c.g.release(c)
	}
	c.mu.Unlock()
	return c.Conn.SetDeadline(t)
}

// expire closes the connection if it is still not admitted.
func (c *guardConn) expire() {
	c.mu.Lock()
	expired := c.state != stateAdmitted && c.state != stateClosed
	if expired {
		c.state = stateClosed
		c.g.release(c)
	}
	c.mu.Unlock()
	if expired {
		c.g.refused.add(reasonAdmitTimeout)
		c.Conn.Close()
	}
}

// evict closes the connection, unless admitted meanwhile, to make room
// for a newer one; the queue has taken its slot.
func (c *guardConn) evict() {
	c.g.dropSource(c.src)
	c.mu.Lock()
	evicted := c.state != stateAdmitted && c.state != stateClosed
	if evicted {
		c.state = stateClosed
		c.timer.Stop()
	}
	c.mu.Unlock()
	if evicted {
		c.g.refused.add(reasonUnadmittedCap)
		c.Conn.Close()
	}
}

// Close closes the connection and returns its slot if it still held one.
func (c *guardConn) Close() error {
	c.mu.Lock()
	if c.state != stateClosed {
		if c.state != stateAdmitted {
			c.g.release(c)
		}
		c.state = stateClosed
		c.timer.Stop()
	}
	c.mu.Unlock()
	return c.Conn.Close()
}

// guardConnKey is the request context key for the request's *guardConn.
type guardConnKey struct{}

// withGuardConn is the http.Server's ConnContext: it puts the connection's
// guardConn (under TLS) in every request's context.
func withGuardConn(ctx context.Context, c net.Conn) context.Context {
	if tc, ok := c.(interface{ NetConn() net.Conn }); ok {
		if gc, ok := tc.NetConn().(*guardConn); ok {
			return context.WithValue(ctx, guardConnKey{}, gc)
		}
	}
	return ctx
}

// markingUpgrades marks a request's connection upgraded before h (the DERP
// handler) takes it over.
func markingUpgrades(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if gc, ok := r.Context().Value(guardConnKey{}).(*guardConn); ok && r.Header.Get("Upgrade") != "" {
			gc.markUpgraded()
		}
		h.ServeHTTP(w, r)
	})
}
