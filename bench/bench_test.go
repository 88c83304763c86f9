package bench

import (
	"os"
	"strings"
	"testing"
	"time"
)

// TestSmoke runs `make bench-smoke`'s subset so that the harness cannot rot:
// the tsrelay path (which must be a peer-relay path), tsrelay readiness, RSS
// and binary sizes, and the Markdown and JSON output. It needs no root: every
// node uses userspace networking on 127.0.0.1.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the relay and three tailscaled processes; skipped in -short mode")
	}
	start := time.Now()
	rep, err := Run(t.Context(), Config{Smoke: true, WorkDir: t.TempDir(), Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("smoke run took %v", time.Since(start).Round(time.Millisecond))

	want := map[string]bool{
		"tsrelay peer relay/TCP throughput a→b":               false,
		"tsrelay peer relay/ping RTT p50":                     false,
		"tsrelay/start → /readyz 200, new identity":           false,
		"tsrelay/start → /readyz 200, existing state":         false,
		"tsrelay/RSS peak while relaying":                     false,
		"tsrelay/stripped binary size (relay)":                false,
		"stock/stripped binary size (tailscaled + tailscale)": false,
	}
	for _, r := range rep.Rows {
		k := r.Scenario + "/" + r.Metric
		if _, ok := want[k]; !ok {
			continue
		}
		if r.Value <= 0 {
			t.Errorf("%s = %v, want > 0", k, r.Value)
		}
		if k == "tsrelay peer relay/TCP throughput a→b" && !strings.Contains(r.Note, "via peer-relay(") {
			t.Errorf("%s went %q, want via peer-relay(…)", k, r.Note)
		}
		want[k] = true
	}
	for k, seen := range want {
		if !seen {
			t.Errorf("no row %q in the report", k)
		}
	}

	dir := t.TempDir()
	md, js, err := rep.WriteFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{md, js} {
		if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
			t.Errorf("%s: %v (empty?)", p, err)
		}
	}
	var b strings.Builder
	rep.WriteMarkdown(&b)
	t.Logf("report:\n%s", b.String())
}
