package relay

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"

	"github.com/tsrelay/tsrelay/lbaddr"
)

func testStatus() *status {
	return newStatus(Config{
		RelayServerPort:            40000,
		RelayServerStaticEndpoints: Endpoints{netip.MustParseAddrPort("192.0.2.7:61441")},
	})
}

// TestReadinessWaitsForLoadBalancer checks that a relay following its
// Service is not ready until it knows an address peers can reach, unless
// explicit endpoints are set.
func TestReadinessWaitsForLoadBalancer(t *testing.T) {
	ready := func(s *status) {
		s.setBackendState(ipn.Running)
		s.setRelay(true, true, 0)
	}
	s := newStatus(Config{RelayServerPort: 61441})
	s.followService("kube-public/tsrelay")
	ready(s)
	if ok, reason := s.readiness(); ok || reason != "waiting for load balancer address: Service kube-public/tsrelay not read yet" {
		t.Errorf("before the Service is read: readiness = %v %q", ok, reason)
	}
	s.setEndpoints(nil, "Service kube-public/tsrelay has no load-balancer address yet")
	if ok, reason := s.readiness(); ok || !strings.HasSuffix(reason, "has no load-balancer address yet") {
		t.Errorf("with no ingress: readiness = %v %q", ok, reason)
	}
	found := []lbaddr.Endpoint{{AddrPort: netip.MustParseAddrPort("192.0.2.10:61441"), Source: lbaddr.SourceService}}
	if _, changed := s.setEndpoints(found, ""); !changed {
		t.Error("setEndpoints did not report a change")
	}
	// New endpoints are not in force until the reconcile loop applies them.
	if ok, reason := s.readiness(); ok || reason != "relay prefs not applied yet" {
		t.Errorf("with an address not yet applied: readiness = %v %q", ok, reason)
	}
	s.setRelay(true, true, 0)
	if ok, reason := s.readiness(); !ok {
		t.Errorf("with an address applied: readiness = %v %q, want ready", ok, reason)
	}
	if _, changed := s.setEndpoints(slices.Clone(found), ""); changed {
		t.Error("setEndpoints reported a change for the same endpoints")
	}

	// Explicit endpoints are enough on their own.
	s = newStatus(Config{RelayServerPort: 61441, RelayServerStaticEndpoints: Endpoints{netip.MustParseAddrPort("203.0.113.7:61441")}})
	s.followService("kube-public/tsrelay")
	ready(s)
	if ok, reason := s.readiness(); !ok {
		t.Errorf("with explicit endpoints: readiness = %v %q, want ready", ok, reason)
	}
}

func TestReadiness(t *testing.T) {
	tests := []struct {
		name       string
		setup      func(s *status)
		wantReady  bool
		wantReason string
	}{
		{"new", func(s *status) {}, false, "starting"},
		{"needs login", func(s *status) {
			s.setBackendState(ipn.NeedsLogin)
			s.setLoginPending()
		}, false, "NeedsLogin: login URL printed in the log"},
		{"login error", func(s *status) {
			s.setBackendState(ipn.NeedsLogin)
			s.setBackendError("invalid key: unable to validate API key")
		}, false, "NeedsLogin: invalid key"},
		{"health warning while starting", func(s *status) {
			s.setBackendState(ipn.Starting)
			s.setNode(&ipnstate.Status{Health: []string{"not connected to home DERP region 1"}})
		}, false, "Starting: not connected to home DERP"},
		{"running, prefs pending", func(s *status) {
			s.setBackendState(ipn.Running)
		}, false, "relay prefs not applied yet"},
		{"running, not bound", func(s *status) {
			s.setBackendState(ipn.Running)
			s.setRelay(true, false, 0)
		}, false, "relay not bound on UDP port 40000"},
		{"running, disabled by tailnet", func(s *status) {
			s.setBackendState(ipn.Running)
			s.setRelay(true, true, 0)
			s.setProblem("the tailnet disabled the relay server")
		}, false, "the tailnet disabled the relay server"},
		{"ready", func(s *status) {
			s.setBackendState(ipn.Running)
			s.setRelay(true, true, 2)
		}, true, "ok"},
		{"ready, then logged out", func(s *status) {
			s.setBackendState(ipn.Running)
			s.setRelay(true, true, 2)
			s.setBackendState(ipn.NeedsLogin)
		}, false, "NeedsLogin"},
		{"error cleared by running", func(s *status) {
			s.setBackendState(ipn.NeedsLogin)
			s.setBackendError("boom")
			s.setBackendState(ipn.Running)
			s.setRelay(true, true, 0)
		}, true, "ok"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := testStatus()
			tt.setup(s)
			ready, reason := s.readiness()
			if ready != tt.wantReady || !strings.HasPrefix(reason, tt.wantReason) {
				t.Errorf("readiness() = %v, %q; want %v, %q…", ready, reason, tt.wantReady, tt.wantReason)
			}
		})
	}
}

func TestReadyzHandler(t *testing.T) {
	a := &appliance{status: testStatus()}
	h := a.handler()
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

	a.status.setBackendState(ipn.NeedsLogin)
	a.status.setLoginPending()
	if rec := get("/readyz"); rec.Code != http.StatusServiceUnavailable || !strings.HasPrefix(rec.Body.String(), "NeedsLogin") {
		t.Errorf("GET /readyz while NeedsLogin = %d %q, want 503 NeedsLogin…", rec.Code, rec.Body)
	}
	// Liveness does not depend on login.
	if rec := get("/healthz"); rec.Code != http.StatusOK {
		t.Errorf("GET /healthz before the backend started = %d %q, want 200", rec.Code, rec.Body)
	}

	a.status.setBackendState(ipn.Running)
	a.status.setNode(&ipnstate.Status{TailscaleIPs: []netip.Addr{netip.MustParseAddr("100.64.0.9")}, Self: &ipnstate.PeerStatus{DNSName: "tsrelay.example.ts.net."}})
	a.status.setRelay(true, true, 3)
	if rec := get("/readyz"); rec.Code != http.StatusOK || strings.TrimSpace(rec.Body.String()) != "ok" {
		t.Errorf("GET /readyz when ready = %d %q, want 200 ok", rec.Code, rec.Body)
	}

	for _, rec := range []*httptest.ResponseRecorder{get("/readyz?verbose"), get("/readyz", "Accept", "application/json")} {
		if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("verbose /readyz = %d %s, want 200 JSON", rec.Code, rec.Header().Get("Content-Type"))
		}
		var got statusJSON
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("verbose /readyz is not JSON: %v\n%s", err, rec.Body)
		}
		if !got.Ready || got.BackendState != "Running" || got.Relay.Port != 40000 || !got.Relay.Bound ||
			got.Relay.Sessions != 3 || len(got.TailscaleIPs) != 1 || got.DNSName != "tsrelay.example.ts.net" ||
			len(got.Relay.StaticEndpoints) != 1 || got.Relay.StaticEndpoints[0].AddrPort.String() != "192.0.2.7:61441" ||
			got.Relay.StaticEndpoints[0].Source != lbaddr.SourceExplicit {
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
		a := &appliance{status: testStatus(), cfg: Config{DebugPprof: on}}
		rec := httptest.NewRecorder()
		a.handler().ServeHTTP(rec, httptest.NewRequest("GET", "/debug/pprof/heap?debug=1", nil))
		switch {
		case on && (rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), "heap profile")):
			t.Errorf("TS_DEBUG_PPROF=true: GET /debug/pprof/heap = %d %.80q, want 200 and a heap profile", rec.Code, rec.Body)
		case !on && rec.Code != http.StatusNotFound:
			t.Errorf("TS_DEBUG_PPROF=false: GET /debug/pprof/heap = %d, want 404", rec.Code)
		}
	}
}
