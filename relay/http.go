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

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/httpserve"
	"github.com/tsrelay/tsrelay/kubestate"
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

// listenHTTP listens on TS_LOCAL_ADDR_PORT, so that a port in use fails the
// start before anything is contacted.
func listenHTTP(cfg Config) (net.Listener, error) {
	ln, err := net.Listen("tcp", cfg.LocalAddrPort.String())
	if err != nil {
		return nil, fmt.Errorf("listen on TS_LOCAL_ADDR_PORT=%s: %w", cfg.LocalAddrPort, err)
	}
	return ln, nil
}

// newHTTPServer returns the server for ln; store is the Secret store whose
// writes /metrics counts, nil for a directory.
func newHTTPServer(ln net.Listener, cfg Config, st *status, a *appliance, derp *derpregion.Instance, store *kubestate.Store, logger *slog.Logger) *httpServer {
	h := &handlers{cfg: cfg, status: st, node: a, derp: derp, store: store, logger: logger}
	return &httpServer{ln: ln, handler: h.mux(store), logger: logger}
}

// run serves until ctx is done, then drains requests, with the limits that
// keep abuse of the port from pushing the process near its memory limit
// (internal/httpserve).
func (s *httpServer) run(ctx context.Context) error {
	return httpserve.Serve(ctx, s.ln, s.handler, s.logger)
}

// handlers answer the HTTP requests from what status holds, asking the
// node only for what is live (its liveness, the session table, metrics).
type handlers struct {
	cfg    Config
	status *status
	node   *appliance
	derp   *derpregion.Instance // nil unless TS_DERP_PORT is set
	store  *kubestate.Store     // nil with a state directory
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
func (h *handlers) mux(store *kubestate.Store) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", h.healthz)
	mux.HandleFunc("GET /readyz", h.readyz)
	mux.Handle("GET /metrics", h.metrics(store))
	if h.derp != nil {
		mux.Handle("GET /derpmap", h.derp)
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
	snap.DERP = h.derp.Status()
	snap.State = stateJSON(h.store)
	w.Header().Set("Content-Type", "application/json")
	if !snap.Ready {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(snap)
}
