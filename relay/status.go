package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	udprelaystatus "tailscale.com/net/udprelay/status"

	"github.com/tsrelay/tsrelay/lbaddr"
)

// livenessTimeout bounds the in-memory LocalAPI call behind /healthz. It does
// not involve the control server, so a slow answer means a wedged backend.
const livenessTimeout = 3 * time.Second

// status is what the relay knows about itself, shared between the reconcile
// loop (writer) and the HTTP handlers (readers).
type status struct {
	port uint16

	mu sync.Mutex
	// endpoints are the static endpoints to advertise: the explicit ones,
	// then those found from the Service (see lbaddr.Merge).
	endpoints []lbaddr.Endpoint
	// service is "namespace/name" of the Service the relay follows, or "".
	service string
	// lbWhy says why no endpoint was found from the Service, while none is.
	lbWhy string

	backendState ipn.State
	backendErr   string   // last error the backend announced; cleared when Running
	health       []string // Tailscale's health warnings, shown while not Running
	dnsName      string
	ips          []netip.Addr
	problem      string // a reason not to be ready that the backend does not know
	prefsApplied bool
	bound        bool
	sessions     int
	mtu          mtuCheck // the last path MTU check; never affects readiness
}

func newStatus(cfg Config) *status {
	merged, _ := lbaddr.Merge(cfg.RelayServerStaticEndpoints, nil, lbaddr.MaxEndpoints)
	return &status{port: uint16(cfg.RelayServerPort), endpoints: merged}
}

// followService notes that endpoints come from Service ref
// ("namespace/name") too, and that none was found from it yet.
func (s *status) followService(ref string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.service = ref
	s.lbWhy = "Service " + ref + " not read yet"
}

// setEndpoints records the endpoints to advertise, and why the Service gave
// none, and reports the previous endpoints and whether they changed.
func (s *status) setEndpoints(eps []lbaddr.Endpoint, why string) (old []lbaddr.Endpoint, changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, s.endpoints, s.lbWhy = s.endpoints, eps, why
	changed = !slices.Equal(old, eps)
	if changed {
		s.prefsApplied = false // until the reconcile loop applies them
	}
	return old, changed
}

// endpointAddrs returns the addresses of the endpoints to advertise.
func (s *status) endpointAddrs() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]netip.AddrPort, len(s.endpoints))
	for i, e := range s.endpoints {
		out[i] = e.AddrPort
	}
	return out
}

// setBackendState records the IPN state and reports the previous one.
func (s *status) setBackendState(st ipn.State) (old ipn.State, changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, s.backendState = s.backendState, st
	if st == ipn.Running {
		s.backendErr = ""
	}
	if st != ipn.Running {
		s.prefsApplied, s.bound, s.sessions = false, false, 0
	}
	return old, old != st
}

// setBackendError records an error the backend announced and reports
// whether it differs from the last one.
func (s *status) setBackendError(msg string) (changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed = s.backendErr != msg
	s.backendErr = msg
	return changed
}

// setLoginPending notes that an interactive login is pending. The URL itself
// is logged, never served: /readyz may be reachable through the load
// balancer, and whoever opens the URL first owns the node.
func (s *status) setLoginPending() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.backendErr == "" {
		s.backendErr = "login URL printed in the log; open it, or restart with TS_AUTHKEY set"
	}
}

// setNode records what the node reports about itself and clears any problem
// found by an earlier pass.
func (s *status) setNode(st *ipnstate.Status) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ips = st.TailscaleIPs
	s.health = st.Health
	s.problem = ""
	if st.Self != nil {
		s.dnsName = strings.TrimSuffix(st.Self.DNSName, ".")
	}
}

func (s *status) setProblem(p string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.problem = p
}

// setRelay records the relay server's state and reports whether its
// bound-ness changed, so that callers log transitions only.
func (s *status) setRelay(prefsApplied, bound bool, sessions int) (changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed = s.bound != bound
	s.prefsApplied, s.bound, s.sessions = prefsApplied, bound, sessions
	return changed
}

// readiness reports whether the relay is serving, and if not, why, in one
// line that starts with the condition (NeedsLogin, relay not bound, …).
func (s *status) readiness() (ready bool, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.readinessLocked()
}

func (s *status) readinessLocked() (bool, string) {
	detail := func(state string) string {
		switch {
		case s.backendErr != "":
			return state + ": " + s.backendErr
		case len(s.health) > 0:
			return state + ": " + strings.Join(s.health, "; ")
		}
		return state
	}
	switch s.backendState {
	case ipn.NoState:
		return false, "starting"
	case ipn.NeedsLogin:
		return false, detail("NeedsLogin")
	case ipn.NeedsMachineAuth:
		return false, "NeedsMachineAuth: approve this device in the tailnet's admin console"
	case ipn.Stopped:
		return false, "Stopped"
	case ipn.Starting:
		return false, detail("Starting")
	}
	switch {
	case s.problem != "":
		return false, s.problem
	case s.service != "" && len(s.endpoints) == 0:
		// Advertising only pod-network addresses would send peers to an
		// address they cannot reach.
		return false, "waiting for load balancer address: " + s.lbWhy
	case !s.prefsApplied:
		return false, "relay prefs not applied yet"
	case !s.bound:
		return false, fmt.Sprintf("relay not bound on UDP port %d", s.port)
	}
	return true, "ok"
}

// statusJSON is the verbose form of /readyz. It holds nothing secret.
type statusJSON struct {
	Ready        bool         `json:"ready"`
	Reason       string       `json:"reason"`
	BackendState string       `json:"backendState"`
	DNSName      string       `json:"dnsName,omitempty"`
	TailscaleIPs []netip.Addr `json:"tailscaleIPs"`
	Relay        relayJSON    `json:"relay"`
	Health       []string     `json:"health,omitempty"`
	// PathMTU is the last check of the path MTU; nil before the first.
	PathMTU *pathMTUJSON `json:"pathMTU,omitempty"`
	// Warnings are problems that slow relaying down without stopping it,
	// one line each. They do not affect readiness.
	Warnings []string `json:"warnings,omitempty"`
	// DERP is the in-cluster DERP region (derp.go); absent when off.
	DERP *derpStatusJSON `json:"derp,omitempty"`
}

type relayJSON struct {
	Port            uint16            `json:"port"`
	PrefsApplied    bool              `json:"prefsApplied"`
	Bound           bool              `json:"bound"`
	StaticEndpoints []lbaddr.Endpoint `json:"staticEndpoints"`
	// Service is the Service endpoints are found from, namespace/name.
	Service  string `json:"service,omitempty"`
	Sessions int    `json:"sessions"`
	// SessionTable is read live from the relay server for each request.
	SessionTable []sessionJSON `json:"sessionTable,omitempty"`
}

// sessionJSON is one relayed pair of peers. Disco keys are left out: they
// mean nothing to people and change with every restart of a peer.
type sessionJSON struct {
	VNI     uint32        `json:"vni"`
	Clients [2]clientJSON `json:"clients"`
}

type clientJSON struct {
	Endpoint  netip.AddrPort `json:"endpoint"`
	PacketsTx uint64         `json:"packetsTx"`
	BytesTx   uint64         `json:"bytesTx"`
}

// sessionTable converts the relay server's view of its sessions.
func sessionTable(st *udprelaystatus.ServerStatus) []sessionJSON {
	out := make([]sessionJSON, 0, len(st.Sessions))
	for _, s := range st.Sessions {
		out = append(out, sessionJSON{VNI: s.VNI, Clients: [2]clientJSON{
			{s.Client1.Endpoint, s.Client1.PacketsTx, s.Client1.BytesTx},
			{s.Client2.Endpoint, s.Client2.PacketsTx, s.Client2.BytesTx},
		}})
	}
	return out
}

func (s *status) snapshot() statusJSON {
	s.mu.Lock()
	defer s.mu.Unlock()
	ready, reason := s.readinessLocked()
	return statusJSON{
		Ready:        ready,
		Reason:       reason,
		BackendState: s.backendState.String(),
		DNSName:      s.dnsName,
		TailscaleIPs: append([]netip.Addr{}, s.ips...),
		Relay: relayJSON{
			Port:            s.port,
			PrefsApplied:    s.prefsApplied,
			Bound:           s.bound,
			StaticEndpoints: append([]lbaddr.Endpoint{}, s.endpoints...),
			Service:         s.service,
			Sessions:        s.sessions,
		},
		Health:   append([]string(nil), s.health...),
		PathMTU:  pathMTUStatus(s.mtu),
		Warnings: s.warningsLocked(),
	}
}

// warningsLocked lists what slows relaying down without stopping it.
func (s *status) warningsLocked() []string {
	if w := s.mtu.report.Summary(); w != "" {
		return []string{w}
	}
	return nil
}

// handler serves the probes:
//   - /healthz: the process and its Tailscale backend answer. It never asks
//     the control server, so a control outage does not restart the pod.
//   - /readyz: the node is Running, the relay prefs are in force and the
//     relay socket is bound. ?verbose or Accept: application/json gives the
//     full status as JSON.
//   - /metrics: Prometheus metrics (see metrics.go).
func (a *appliance) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", a.serveHealthz)
	mux.HandleFunc("GET /readyz", a.serveReadyz)
	mux.Handle("GET /metrics", a.metricsHandler(a.stats))
	if a.derp != nil {
		mux.HandleFunc("GET /derpmap", a.derp.serveDERPMap)
	}
	if a.cfg.DebugPprof {
		// Already linked (Tailscale's LocalAPI serves it too), so this
		// costs no binary size.
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	}
	return mux
}

func (a *appliance) serveHealthz(w http.ResponseWriter, r *http.Request) {
	lc := a.localClient()
	if lc == nil {
		fmt.Fprintln(w, "ok: starting")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), livenessTimeout)
	defer cancel()
	if _, err := lc.StatusWithoutPeers(ctx); err != nil {
		http.Error(w, "tailscale backend not answering: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ok")
}

func (a *appliance) serveReadyz(w http.ResponseWriter, r *http.Request) {
	_, verbose := r.URL.Query()["verbose"]
	if verbose || strings.Contains(r.Header.Get("Accept"), "application/json") {
		snap := a.status.snapshot()
		if lc := a.localClient(); lc != nil && snap.Relay.Bound {
			ctx, cancel := context.WithTimeout(r.Context(), livenessTimeout)
			defer cancel()
			if rs, err := lc.DebugPeerRelaySessions(ctx); err == nil {
				snap.Relay.SessionTable = sessionTable(rs)
				snap.Relay.Sessions = len(rs.Sessions)
			}
		}
		snap.DERP = a.derp.statusJSON()
		if ok, why := a.derp.readiness(); snap.Ready && !ok {
			snap.Ready, snap.Reason = false, why
		}
		w.Header().Set("Content-Type", "application/json")
		if !snap.Ready {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(snap)
		return
	}
	ready, reason := a.status.readiness()
	if ok, why := a.derp.readiness(); ready && !ok {
		ready, reason = false, why
	}
	if !ready {
		http.Error(w, reason, http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, reason)
}
