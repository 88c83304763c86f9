package relay

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"tailscale.com/envknob"

	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/lease"
)

// TestRunServesTheWaitForTheIdentity runs the relay in process while
// another process holds its state directory's lock. One HTTP server
// answers from the start: /healthz 200; /readyz, plain and verbose, 503
// with who holds the identity; /metrics one valid exposition from the
// run's one registry, the relay's own series and Go's among it, with
// tsrelay_identity_waiting 1. Once the lock is free the same server
// answers from the node, and a stop releases the port and the lock.
func TestRunServesTheWaitForTheIdentity(t *testing.T) {
	cfg := inProcessConfig(t)
	httpAddr, err := tailnettest.FreeTCPAddr()
	if err != nil {
		t.Fatal(err)
	}
	dir := cfg.StateDir
	cfg.LocalAddrPort = ListenAddr(netip.MustParseAddrPort(httpAddr))
	cfg.LeaseDuration = lease.DefaultDuration
	cfg.NoLogsNoSupport = true
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	other, err := lease.LockDir(t.Context(), dir, "other-process", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	envknob.Setenv("TS_DISABLE_PORTMAPPER", "1")
	envknob.Setenv("TS_PANIC_IF_HIT_MAIN_CONTROL", "1")
	ctx, cancel := context.WithCancel(t.Context())
	done, finished := make(chan error, 1), make(chan struct{})
	go func() {
		defer close(finished)
		done <- Run(ctx, cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
	}()
	t.Cleanup(func() { cancel(); <-finished })

	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := client.Get("http://" + httpAddr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		return resp.StatusCode, string(b)
	}
	metrics := func() map[string]*dto.MetricFamily {
		t.Helper()
		code, body := get("/metrics")
		// The text parser rejects a family declared twice.
		p := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := p.TextToMetricFamilies(strings.NewReader(body))
		if code != http.StatusOK || err != nil {
			t.Fatalf("/metrics = %d, %v", code, err)
		}
		return fams
	}
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()

	const reason = "waiting for the node identity, held by process other-process (state directory lock)"
	var last string
	if err := tailnettest.WaitFor(wctx, 20*time.Millisecond, func() (bool, error) {
		resp, err := client.Get("http://" + httpAddr + "/readyz")
		if err != nil {
			return false, nil // not listening yet
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		last = string(b)
		return resp.StatusCode == http.StatusServiceUnavailable && strings.TrimSpace(last) == reason, err
	}); err != nil {
		t.Fatalf("/readyz never said %q; last %q: %v", reason, last, err)
	}
	if code, body := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz while waiting = %d %q, want 200", code, body)
	}
	code, body := get("/readyz?verbose")
	var st readyz.Status
	if err := json.Unmarshal([]byte(body), &st); code != http.StatusServiceUnavailable || err != nil || st.Ready || st.Reason != reason {
		t.Errorf("/readyz?verbose while waiting = %d %+v (%v), want 503 JSON with reason %q", code, st, err, reason)
	}
	fams := metrics()
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tsrelay_identity_waiting", nil, 1},
		{"tsrelay_ready", nil, 0},
		{"tsrelay_identity_info", []string{"hostname", "relay", "state", dir, "dns_name", ""}, 1},
		{"tsrelay_build_info", nil, 1},
	} {
		if got, ok := tailnettest.MetricSum(fams, c.name, c.labels...); !ok || got != c.want {
			t.Errorf("while waiting: %s%v = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	if _, ok := fams["go_goroutines"]; !ok {
		t.Error("while waiting: /metrics lacks go_goroutines: not the run's registry")
	}

	if err := other.Unlock(); err != nil {
		t.Fatal(err)
	}
	if err := tailnettest.WaitFor(wctx, 50*time.Millisecond, func() (bool, error) {
		code, body = get("/readyz")
		return code == http.StatusOK, nil
	}); err != nil {
		t.Fatalf("/readyz never 200 once the lock was free; last %d %q", code, body)
	}
	fams = metrics()
	if v, ok := tailnettest.MetricSum(fams, "tsrelay_identity_waiting"); !ok || v != 0 {
		t.Errorf("once the identity is held: tsrelay_identity_waiting = %v (present %v), want 0", v, ok)
	}
	if v, _ := tailnettest.MetricSum(fams, "tsrelay_identity_info", "hostname", "relay", "state", dir); v != 1 {
		t.Errorf("once the identity is held: tsrelay_identity_info{state=%s} = %v, want 1", dir, v)
	}
	node := false
	for name := range fams {
		node = node || strings.HasPrefix(name, "tailscaled_")
	}
	if !node {
		t.Error("once the node runs, /metrics lacks Tailscale's series: the server does not answer from the node")
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after a stop = %v, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return 30 s after the stop")
	}
	ln, err := net.Listen("tcp", httpAddr)
	if err != nil {
		t.Fatalf("TS_LOCAL_ADDR_PORT still in use after Run returned: %v", err)
	}
	ln.Close()
	lctx, lcancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer lcancel()
	l, err := lease.LockDir(lctx, dir, "next-process", nil, nil)
	if err != nil {
		t.Fatalf("state directory still locked after Run returned: %v", err)
	}
	l.Unlock()
}
