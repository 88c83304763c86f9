package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"
)

// localAPITimeout bounds the in-memory LocalAPI calls an HTTP request makes
// (/healthz's status, the session table, Tailscale's metrics). They do not
// involve the control server, so a slow answer means a wedged backend.
const localAPITimeout = 3 * time.Second

// httpServer serves the probes and metrics on TS_LOCAL_ADDR_PORT.
type httpServer struct {
	ln      net.Listener
	handler http.Handler
	logger  *slog.Logger
}

// newHTTPServer listens on cfg.LocalAddrPort, so that a port in use fails
// the start before anything is contacted; run serves it.
func newHTTPServer(cfg Config, st *status, a *appliance, derp *derpRegion, stats statsSource, logger *slog.Logger) (*httpServer, error) {
	ln, err := net.Listen("tcp", cfg.LocalAddrPort)
	if err != nil {
		return nil, fmt.Errorf("listen on TS_LOCAL_ADDR_PORT=%s: %w", cfg.LocalAddrPort, err)
	}
	h := &handlers{cfg: cfg, status: st, node: a, derp: derp, logger: logger}
	return &httpServer{ln: ln, handler: h.mux(stats), logger: logger}, nil
}

// run serves until ctx is done, then drains requests.
func (s *httpServer) run(ctx context.Context) error {
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.logger.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(s.ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve HTTP on %s: %w", s.ln.Addr(), err)
	case <-ctx.Done():
	}
	// ctx is already cancelled; draining needs a deadline of its own.
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("shut down HTTP server: %w", err)
	}
	return ctx.Err()
}

// handlers answer the HTTP requests from what status holds, asking the
// node only for what is live (its liveness, the session table, metrics).
type handlers struct {
	cfg    Config
	status *status
	node   *appliance
	derp   *derpRegion // nil unless TS_DERP_PORT is set
	logger *slog.Logger
}

// mux routes the probes:
//   - /healthz: the process and its Tailscale backend answer. It never asks
//     the control server, so a control outage does not restart the pod.
//   - /readyz: the node is Running, the relay prefs are in force and the
//     relay socket is bound. ?verbose or Accept: application/json gives the
//     full status as JSON (internal/readyz).
//   - /metrics: Prometheus metrics (see metrics.go).
//   - /derpmap: with the DERP region on, the derpMap to paste into the
//     tailnet policy file (?format=headscale: Headscale's YAML).
func (h *handlers) mux(stats statsSource) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", h.healthz)
	mux.HandleFunc("GET /readyz", h.readyz)
	mux.Handle("GET /metrics", h.metrics(stats))
	if h.derp != nil {
		mux.HandleFunc("GET /derpmap", h.derp.serveDERPMap)
	}
	if h.cfg.DebugPprof {
		// Already linked (Tailscale's LocalAPI serves it too), so this
		// costs no binary size.
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	}
	return mux
}

func (h *handlers) healthz(w http.ResponseWriter, r *http.Request) {
	lc := h.node.localClient()
	if lc == nil {
		fmt.Fprintln(w, "ok: starting")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), localAPITimeout)
	defer cancel()
	if _, err := lc.StatusWithoutPeers(ctx); err != nil {
		http.Error(w, "tailscale backend not answering: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ok")
}

func (h *handlers) readyz(w http.ResponseWriter, r *http.Request) {
	_, verbose := r.URL.Query()["verbose"]
	if !verbose && !strings.Contains(r.Header.Get("Accept"), "application/json") {
		ready, reason := h.status.readiness()
		if !ready {
			http.Error(w, reason, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, reason)
		return
	}
	snap := h.status.snapshot()
	if snap.Relay.Bound {
		if table, ok := h.node.relaySessions(r.Context()); ok {
			snap.Relay.SessionTable = table
			snap.Relay.Sessions = len(table)
		}
	}
	snap.DERP = h.derp.statusJSON()
	w.Header().Set("Content-Type", "application/json")
	if !snap.Ready {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(snap)
}
