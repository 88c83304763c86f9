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
// The limit on connections trades availability for memory: while more than
// MaxConns connections are held open, a new one (the kubelet's probe
// included) waits in the accept queue until held ones time out: a
// ReadHeaderTimeout for each MaxConns connections ahead of it (4 s behind
// 1,000 held connections). Without the cap, memory would grow with the number of
// connections an attacker opens, and the pod would be OOM-killed instead.
package httpserve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"golang.org/x/net/netutil"
)

const (
	// MaxHeaderBytes bounds a request's header. The port serves /healthz,
	// /readyz and /metrics to the kubelet and Prometheus, whose requests
	// carry a few hundred bytes of header (a bearer token, if Prometheus
	// sends one, about 1 KiB); net/http allows 4 KiB of slack on top and
	// answers a bigger header with 431 and closes the connection.
	MaxHeaderBytes = 4 << 10

	// MaxConns caps the connections served at once. Further connections
	// wait in the kernel's accept queue, which costs the process nothing,
	// until one closes. A connection costs the relay a few tens of KiB of
	// RSS at most (goroutine stack, buffers, garbage not yet collected),
	// most when it is being refused a 1 MiB header, so 512 keeps the port
	// under about 32 MiB however many connections arrive, where 1,024
	// let 1,000 connections sending 1 MiB headers take 56 MiB. make
	// bench's "HTTP port abuse" rows measure it against that goal
	// (bench/results/reference.md).
	MaxConns = 512

	// ReadHeaderTimeout closes a connection that has not sent a whole
	// header in time; with MaxConns it bounds how long abusers can hold
	// the slots, and so how long a probe waits behind them. The kubelet
	// and Prometheus send their few hundred bytes in one segment.
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
	go func() { errc <- srv.Serve(netutil.LimitListener(ln, MaxConns)) }()
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
// listener with the connection cap.
//
// Keep-alives are off: a connection serves one request and closes. With
// them, a client that finished one request kept its slot for the idle
// timeout, and for ever with a request a little more often than that
// (issue 27), so 512 such clients held every slot and the kubelet's
// probes timed out. The kubelet opens a connection per probe anyway;
// Prometheus pays one TCP handshake per scrape.
func New(h http.Handler, logger *slog.Logger) *http.Server {
	srv := &http.Server{
		Handler:           h,
		MaxHeaderBytes:    MaxHeaderBytes,
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	srv.SetKeepAlivesEnabled(false)
	return srv
}
