package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/httpserve"
	"github.com/tsrelay/tsrelay/kubestate"
)

// localAPITimeout bounds the in-memory LocalAPI calls an HTTP request makes
// (/healthz's status, the session table, Tailscale's metrics). They do not
// involve the control server, so a slow answer means a wedged backend.
const localAPITimeout = 3 * time.Second

// httpServer serves the probes and metrics on TS_LOCAL_ADDR_PORT for the
// whole run: from before the node identity is acquired, from the status
// alone, until the relay has stopped.
type httpServer struct {
	ln net.Listener
	*handlers
}

// newHTTPServer listens on TS_LOCAL_ADDR_PORT, so that a port in use fails
// the start before anything is contacted, and returns the server that
// answers there from st.
func newHTTPServer(cfg Config, st *status, logger *slog.Logger) (*httpServer, error) {
	ln, err := net.Listen("tcp", cfg.LocalAddrPort.String())
	if err != nil {
		return nil, fmt.Errorf("listen on TS_LOCAL_ADDR_PORT=%s: %w", cfg.LocalAddrPort, err)
	}
	return &httpServer{ln: ln, handlers: newHandlers(cfg, st, logger)}, nil
}

// run serves until ctx is done, then drains requests, with the limits that
// keep abuse of the port from pushing the process near its memory limit
// (internal/httpserve). It returns nil after a shutdown, an error only if
// serving failed.
func (s *httpServer) run(ctx context.Context) error {
	err := httpserve.Serve(ctx, s.ln, s.handlers, s.logger)
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return nil
	}
	return err
}

// handlers answer the HTTP requests from what status holds, asking the
// node only for what is live (its liveness, the session table, metrics).
// They serve one mux and one metrics registry for the whole run.
type handlers struct {
	cfg    Config
	status *status
	logger *slog.Logger
	mux    *http.ServeMux
	reg    *prometheus.Registry
	node   atomic.Pointer[nodeParts] // nil until serveNode
}

// nodeParts are the parts of a running node the handlers ask.
type nodeParts struct {
	node  *tailnetNode
	derp  *derpregion.Instance // nil unless TS_DERP_PORT is set
	store *kubestate.Store     // nil with a state directory
}

// newHandlers routes the probes:
//   - /healthz: the process and its Tailscale backend answer. It never asks
//     the control server, so a control outage does not restart the pod.
//   - /readyz: the node is Running, the relay prefs are in force and the
//     relay socket is bound. ?verbose or Accept: application/json gives the
//     full status as JSON (internal/readyz).
//   - /metrics: Prometheus metrics (see metrics.go).
//   - /derpmap: with the DERP region on, the derpMap to paste into the
//     tailnet policy file (?format=headscale: Headscale's YAML); from
//     serveNode on.
func newHandlers(cfg Config, st *status, logger *slog.Logger) *handlers {
	h := &handlers{cfg: cfg, status: st, logger: logger, mux: http.NewServeMux(), reg: prometheus.NewRegistry()}
	h.mux.HandleFunc("GET /healthz", h.healthz)
	h.mux.HandleFunc("GET /readyz", h.readyz)
	h.mux.Handle("GET /metrics", h.metrics())
	if h.cfg.DebugPprof {
		// Already linked (Tailscale's LocalAPI serves it too), so this
		// costs no binary size.
		h.mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		h.mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	}
	return h
}

// serveNode makes the handlers answer from the node too, once this process
// holds the identity and the node is built; call it once.
func (h *handlers) serveNode(p *nodeParts) {
	if p.derp != nil {
		h.reg.MustRegister(p.derp.Collector())
		h.mux.Handle("GET /derpmap", p.derp)
	}
	h.node.Store(p)
}

// parts returns the running node's parts, all nil before serveNode.
func (h *handlers) parts() nodeParts {
	if p := h.node.Load(); p != nil {
		return *p
	}
	return nodeParts{}
}

// ServeHTTP implements http.Handler.
func (h *handlers) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

func (h *handlers) healthz(w http.ResponseWriter, r *http.Request) {
	lc := h.parts().node.localClient()
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
	p := h.parts()
	if snap.Relay.Bound {
		if table, ok := p.node.relaySessions(r.Context()); ok {
			snap.Relay.SessionTable = table
			snap.Relay.Sessions = len(table)
		}
	}
	snap.DERP = p.derp.Status()
	snap.State = stateJSON(p.store)
	w.Header().Set("Content-Type", "application/json")
	if !snap.Ready {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(snap)
}
