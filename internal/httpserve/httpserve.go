// Package httpserve serves the relay's health and metrics port with limits
// that keep any amount of abuse of the port far from the pod's memory limit:
// small request headers, a cap on connections open at once, and timeouts on
// every phase of a connection, and one request per connection.
//
// Why: with net/http's defaults (1 MiB of header per request, no cap on
// connections) 200 connections each sending an unfinished 1 MB header got a
// relay with a 256 MiB limit OOM-killed (issue 17). Here a connection costs
// a few tens of KiB at most, there are at most MaxConns of them, and one
// that does not finish its header in ReadHeaderTimeout is closed, as is
// every connection once its one request is answered.
//
// At the cap, a new connection closes the oldest one that has not yet sent
// a whole request (internal/admitq) and is served at once. An earlier
// version made it wait in the accept queue, as netutil.LimitListener does,
// so 1,000 held headers kept the kubelet's probe waiting until held ones
// timed out (/healthz took 1.9 s, over the probe's 1 s; issue 27). Only
// when every connection is being answered does a new one wait, for
// handlers that take milliseconds.
package httpserve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/tsrelay/tsrelay/internal/admitq"
)

const (
	// MaxHeaderBytes bounds a request's header. The port serves /healthz,
	// /readyz and /metrics to the kubelet and Prometheus, whose requests
	// carry a few hundred bytes of header (a bearer token, if Prometheus
	// sends one, about 1 KiB); net/http allows 4 KiB of slack on top and
	// answers a bigger header with 431 and closes the connection.
	MaxHeaderBytes = 4 << 10

	// MaxConns caps the connections open at once; at the cap a new one
	// closes the oldest that has not sent a whole request, so a probe never
	// waits behind held headers. A connection costs the relay a few tens of
	// KiB of RSS at most (goroutine stack, buffers, garbage not yet
	// collected), most when it is being refused a 1 MiB header, so 512 keeps
	// the port under about 32 MiB however many connections arrive, where
	// 1,024 let 1,000 connections sending 1 MiB headers take 56 MiB. make
	// bench's "HTTP port abuse" rows measure it against that goal
	// (bench/results/reference.md).
	MaxConns = 512

	// ReadHeaderTimeout closes a connection that has not sent a whole
	// header in time, cap or no cap. The kubelet and Prometheus send
	// their few hundred bytes in one segment.
	ReadHeaderTimeout = 2 * time.Second
	// ReadTimeout and WriteTimeout bound the rest: these endpoints take
	// no bodies and answer in milliseconds.
	ReadTimeout  = 10 * time.Second
	WriteTimeout = 10 * time.Second

	// ShutdownTimeout is how long requests in flight get to finish once
	// ctx is done. Kubernetes allows 30 s between SIGTERM and SIGKILL by
	// default, and the relay has more to do in it.
	ShutdownTimeout = 5 * time.Second
)

// Serve serves h on ln with the limits above until ctx is done, then drains
// requests for up to ShutdownTimeout and closes what is left. It returns an
// error if serving fails, and ctx's error after a shutdown. It closes ln.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, logger *slog.Logger) error {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	srv := New(h, logger)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(newListener(ln, MaxConns)) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve HTTP on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	// ctx is already cancelled; draining needs a deadline of its own.
	sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		// Connections still busy, such as abusers holding half a
		// header: close them rather than fail the shutdown.
		logger.Warn("HTTP requests still open at shutdown; closing them", "after", ShutdownTimeout, "err", err)
		srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve HTTP on %s: %w", ln.Addr(), err)
	}
	return ctx.Err()
}

// New returns an http.Server for h with the limits above; Serve wraps its
// listener with the connection cap, and a connection leaves the ones that
// may be closed for a new one when h is called (its header is whole).
//
// Keep-alives are off: a connection serves one request and closes. With
// them, a client that finished one request kept its slot for the idle
// timeout, and for ever with a request a little more often than that
// (issue 27), so 512 such clients held every slot and the kubelet's
// probes timed out. The kubelet opens a connection per probe anyway;
// Prometheus pays one TCP handshake per scrape.
func New(h http.Handler, logger *slog.Logger) *http.Server {
	srv := &http.Server{
		Handler:           admitting(h),
		ConnContext:       withConn,
		MaxHeaderBytes:    MaxHeaderBytes,
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	srv.SetKeepAlivesEnabled(false)
	return srv
}

// listener caps the connections open at once. At the cap, a new connection
// closes the oldest one still waiting for its whole request header (see
// the package comment); with none waiting (every connection is being
// answered) it waits for one to close.
type listener struct {
	net.Listener
	slots   chan struct{} // one per open connection
	waiting *admitq.Queue // connections without a whole request yet

	closeOnce sync.Once
	done      chan struct{} // closed by Close: stop waiting for a slot
}

func newListener(ln net.Listener, maxConns int) *listener {
	return &listener{
		Listener: ln,
		slots:    make(chan struct{}, maxConns),
		waiting:  admitq.New(maxConns),
		done:     make(chan struct{}),
	}
}

// Accept accepts a connection and gives it a slot, evicting the oldest
// waiting connection if there is none free. The connection being accepted
// is the one open beyond the cap while it waits.
func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	select {
	case l.slots <- struct{}{}:
	default:
		// The evicted connection's Close frees its slot before
		// EvictOldest returns.
		l.waiting.EvictOldest()
		select {
		case l.slots <- struct{}{}:
		case <-l.done:
			c.Close()
			return nil, net.ErrClosed
		}
	}
	lc := &conn{Conn: c, l: l}
	lc.ticket = l.waiting.Join(func() { lc.Close() })
	return lc, nil
}

// Close closes the listener and stops Accept waiting for a slot.
func (l *listener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// conn holds a slot of its listener until closed, and a place among the
// waiting until its request header is whole.
type conn struct {
	net.Conn
	l         *listener
	ticket    *admitq.Ticket
	closeOnce sync.Once
}

// Close closes the connection and frees its slot (once, however often
// it is closed: by the server, and by an eviction).
func (c *conn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(func() {
		c.ticket.Leave()
		<-c.l.slots
	})
	return err
}

// connKey is the request context key for the request's *conn.
type connKey struct{}

// withConn is the http.Server's ConnContext: it puts the connection in
// its requests' context for admitting.
func withConn(ctx context.Context, c net.Conn) context.Context {
	if lc, ok := c.(*conn); ok {
		return context.WithValue(ctx, connKey{}, lc)
	}
	return ctx
}

// admitting takes a request's connection out of those a new connection may
// evict before h answers it: its header is whole, and the answer takes
// milliseconds (WriteTimeout at most).
func admitting(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if lc, ok := r.Context().Value(connKey{}).(*conn); ok {
			lc.ticket.Leave()
		}
		h.ServeHTTP(w, r)
	})
}
