package relay

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"

	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/lbaddr"
)

// testRelay is an appliance with one explicit endpoint that was never
// started, as newAppliance leaves it.
func testRelay(t *testing.T) *tailnetNode {
	t.Helper()
	return testAppliance(t, Config{
		RelayServerPort:            40000,
		RelayServerStaticEndpoints: Endpoints{netip.MustParseAddrPort("192.0.2.7:61441")},
	}, "")
}

// nodeHandlers returns the HTTP handlers as Run wires them once the node
// (its parts p) runs, answering from st.
func nodeHandlers(cfg Config, st *status, p nodeParts, logger *slog.Logger) *handlers {
	h := newHandlers(cfg, st, logger)
	h.serveNode(&p)
	return h
}

// pass does what a reconcile pass does with what it found, the relay prefs
// applied or not and the socket bound or not: a stands in for the node.
func pass(a *tailnetNode, prefsApplied, bound bool, sessions int) {
	a.relay.seq = a.status.backendSeq()
	a.setRelayState(prefsApplied, bound, sessions)
	a.status.setRelay(a.relay)
}

// TestReadinessWaitsForLoadBalancer checks that a relay following its
// Service is not ready until it knows an address peers can reach, unless
// explicit endpoints are set, and that new endpoints are not in force until
// a reconcile pass applies them.
func TestReadinessWaitsForLoadBalancer(t *testing.T) {
	a := testAppliance(t, Config{RelayServerPort: 61441}, "kube-public/tsrelay")
	s := a.status
	s.setBackendState(ipn.Running)
	pass(a, true, true, 0)
	if ok, reason := s.readiness(); ok || reason != "waiting for load balancer address: Service kube-public/tsrelay not read yet" {
		t.Errorf("before the Service is read: readiness = %v %q", ok, reason)
	}
	a.takeFound(found{why: "Service kube-public/tsrelay has no load-balancer address yet"})
	if ok, reason := s.readiness(); ok || !strings.HasSuffix(reason, "has no load-balancer address yet") {
		t.Errorf("with no ingress: readiness = %v %q", ok, reason)
	}
	eps := []lbaddr.Endpoint{{AddrPort: netip.MustParseAddrPort("192.0.2.10:61441"), Source: lbaddr.SourceService}}
	a.takeFound(found{endpoints: eps})
	if ok, reason := s.readiness(); ok || reason != "relay prefs not applied yet" {
		t.Errorf("with an address not yet applied: readiness = %v %q", ok, reason)
	}
	pass(a, true, true, 0)
	if ok, reason := s.readiness(); !ok {
		t.Errorf("with an address applied: readiness = %v %q, want ready", ok, reason)
	}
	a.takeFound(found{endpoints: slices.Clone(eps)})
	if ok, reason := s.readiness(); !ok {
		t.Errorf("after the same endpoints again: readiness = %v %q, want ready (nothing to apply)", ok, reason)
	}
	if got := s.snapshot().Relay.StaticEndpoints; len(got) != 1 || got[0].AddrPort != eps[0].AddrPort || got[0].Source != "service" {
		t.Errorf("advertised endpoints = %v, want %v", got, eps)
	}

	// Explicit endpoints are enough on their own.
	a = testAppliance(t, Config{RelayServerPort: 61441, RelayServerStaticEndpoints: Endpoints{netip.MustParseAddrPort("203.0.113.7:61441")}}, "kube-public/tsrelay")
	a.status.setBackendState(ipn.Running)
	pass(a, true, true, 0)
	if ok, reason := a.status.readiness(); !ok {
		t.Errorf("with explicit endpoints: readiness = %v %q, want ready", ok, reason)
	}
}

func TestReadiness(t *testing.T) {
	tests := []struct {
		name       string
		setup      func(a *tailnetNode, s *status)
		wantReady  bool
		wantReason string
	}{
		{"new", func(a *tailnetNode, s *status) {}, false, "starting"},
		{"needs login", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.NeedsLogin)
			s.setNode(nodeView{loginPending: true})
		}, false, "NeedsLogin: login URL printed in the log"},
		{"login error", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.NeedsLogin)
			s.setBackendError("invalid key: unable to validate API key")
		}, false, "NeedsLogin: invalid key"},
		{"health warning while starting", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.Starting)
			s.setNode(nodeFrom(&ipnstate.Status{Health: []string{"not connected to home DERP region 1"}}))
		}, false, "Starting: not connected to home DERP"},
		{"running, prefs pending", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.Running)
		}, false, "relay prefs not applied yet"},
		{"running, not bound", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.Running)
			pass(a, true, false, 0)
		}, false, "relay not bound on UDP port 40000"},
		{"running, disabled by tailnet", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.Running)
			pass(a, false, false, 0)
			s.setNode(nodeView{problem: "the tailnet disabled the relay server"})
		}, false, "the tailnet disabled the relay server"},
		{"ready", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.Running)
			pass(a, true, true, 2)
		}, true, "ok"},
		{"ready, then logged out", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.Running)
			pass(a, true, true, 2)
			s.setBackendState(ipn.NeedsLogin)
		}, false, "NeedsLogin"},
		// Flags from before a restart of the backend say nothing about
		// the node now: Running again is not ready until a pass.
		{"ready, restarted, no pass yet", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.Running)
			pass(a, true, true, 2)
			s.setBackendState(ipn.Starting)
			s.setBackendState(ipn.Running)
		}, false, "relay prefs not applied yet"},
		{"error cleared by running", func(a *tailnetNode, s *status) {
			s.setBackendState(ipn.NeedsLogin)
			s.setBackendError("boom")
			s.setBackendState(ipn.Running)
			pass(a, true, true, 0)
		}, true, "ok"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := testRelay(t)
			s := a.status
			tt.setup(a, s)
			ready, reason := s.readiness()
			if ready != tt.wantReady || !strings.HasPrefix(reason, tt.wantReason) {
				t.Errorf("readiness() = %v, %q; want %v, %q…", ready, reason, tt.wantReady, tt.wantReason)
			}
		})
	}
}

func TestReadyzHandler(t *testing.T) {
	a := testRelay(t)
	st := a.status
	h := nodeHandlers(Config{}, st, nodeParts{node: a}, nil)
	get := func(path string, hdr ...string) *httptest.ResponseRecorder {
		t.Helper()
		req := httptest.NewRequest("GET", path, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}

	st.setBackendState(ipn.NeedsLogin)
	st.setNode(nodeView{loginPending: true})
	if rec := get("/readyz"); rec.Code != http.StatusServiceUnavailable || !strings.HasPrefix(rec.Body.String(), "NeedsLogin") {
		t.Errorf("GET /readyz while NeedsLogin = %d %q, want 503 NeedsLogin…", rec.Code, rec.Body)
	}
	// Liveness does not depend on login.
	if rec := get("/healthz"); rec.Code != http.StatusOK {
		t.Errorf("GET /healthz before the backend started = %d %q, want 200", rec.Code, rec.Body)
	}

	st.setBackendState(ipn.Running)
	st.setNode(nodeFrom(&ipnstate.Status{TailscaleIPs: []netip.Addr{netip.MustParseAddr("100.64.0.9")}, Self: &ipnstate.PeerStatus{DNSName: "tsrelay.example.ts.net."}}))
	pass(a, true, true, 3)
	if rec := get("/readyz"); rec.Code != http.StatusOK || strings.TrimSpace(rec.Body.String()) != "ok" {
		t.Errorf("GET /readyz when ready = %d %q, want 200 ok", rec.Code, rec.Body)
	}

	for _, rec := range []*httptest.ResponseRecorder{get("/readyz?verbose"), get("/readyz", "Accept", "application/json")} {
		if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("verbose /readyz = %d %s, want 200 JSON", rec.Code, rec.Header().Get("Content-Type"))
		}
		var got readyz.Status
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("verbose /readyz is not JSON: %v\n%s", err, rec.Body)
		}
		if !got.Ready || got.BackendState != "Running" || got.Relay.Port != 40000 || !got.Relay.Bound ||
			got.Relay.Sessions != 3 || len(got.TailscaleIPs) != 1 || got.DNSName != "tsrelay.example.ts.net" ||
			len(got.Relay.StaticEndpoints) != 1 || got.Relay.StaticEndpoints[0].AddrPort.String() != "192.0.2.7:61441" ||
			got.Relay.StaticEndpoints[0].Source != "explicit" {
			t.Errorf("verbose /readyz = %+v", got)
		}
	}

	if rec := get("/nope"); rec.Code != http.StatusNotFound {
		t.Errorf("GET /nope = %d, want 404", rec.Code)
	}
}

// TestDebugPprof: the profiler is served only when TS_DEBUG_PPROF asks for
// it, since a heap profile shows the process's memory.
func TestDebugPprof(t *testing.T) {
	for _, on := range []bool{false, true} {
		a := testRelay(t)
		h := nodeHandlers(Config{DebugPprof: on}, a.status, nodeParts{node: a}, nil)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/debug/pprof/heap?debug=1", nil))
		switch {
		case on && (rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), "heap profile")):
			t.Errorf("TS_DEBUG_PPROF=true: GET /debug/pprof/heap = %d %.80q, want 200 and a heap profile", rec.Code, rec.Body)
		case !on && rec.Code != http.StatusNotFound:
			t.Errorf("TS_DEBUG_PPROF=false: GET /debug/pprof/heap = %d, want 404", rec.Code)
		}
	}
}

// TestDroppedEndpointsShown: past the 16 endpoints a relay advertises, the
// explicit ones are kept first and the found ones cut are shown in
// /readyz?verbose and counted in /metrics, not dropped silently.
func TestDroppedEndpointsShown(t *testing.T) {
	var explicit Endpoints
	for i := range 15 {
		explicit = append(explicit, netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(i + 1)}), 61441))
	}
	a := testAppliance(t, Config{RelayServerPort: 61441, RelayServerStaticEndpoints: explicit}, "kube-public/tsrelay")
	var lb []lbaddr.Endpoint
	for _, ip := range []string{"192.0.2.1", "192.0.2.2", "192.0.2.3"} {
		lb = append(lb, lbaddr.Endpoint{AddrPort: netip.AddrPortFrom(netip.MustParseAddr(ip), 61441), Source: lbaddr.SourceService})
	}
	a.takeFound(found{endpoints: lb})
	snap := a.status.snapshot()
	if n := len(snap.Relay.StaticEndpoints); n != lbaddr.MaxEndpoints {
		t.Fatalf("advertised %d endpoints, want %d", n, lbaddr.MaxEndpoints)
	}
	if got := snap.Relay.StaticEndpoints[14]; got.Source != "explicit" {
		t.Errorf("advertised endpoint 15 = %+v, want the last explicit one kept", got)
	}
	d := snap.Relay.DroppedEndpoints
	if len(d) != 2 || d[0].AddrPort.String() != "192.0.2.2:61441" || d[1].AddrPort.String() != "192.0.2.3:61441" {
		t.Errorf("dropped endpoints = %+v, want 192.0.2.2 and 192.0.2.3 from the Service", d)
	}
	rec := httptest.NewRecorder()
	nodeHandlers(Config{}, a.status, nodeParts{node: a}, nil).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if !strings.Contains(rec.Body.String(), "tsrelay_static_endpoints_dropped 2\n") {
		t.Errorf("/metrics lacks tsrelay_static_endpoints_dropped 2")
	}
}
