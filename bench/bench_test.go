package bench

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tsrelay/tsrelay/internal/testenv"
)

// binEnv passes the binaries' directory from TestSmoke to its isolated copy.
const binEnv = "TSRELAY_BENCH_TEST_BIN"

// TestSmoke runs `make bench-smoke`'s subset so that the harness cannot rot:
// in new namespaces (RunIsolated, as make bench does), the tsrelay path with
// one pair (which must be a peer-relay path through the relay's forwarded
// address), tsrelay readiness, RSS, binary sizes, and the Markdown and JSON
// output.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the relay and two tailscaled processes in network namespaces; skipped in -short mode")
	}
	if !Isolated() {
		testenv.SkipUnlessRoot(t, "network namespaces and TUN devices")
		if err := CheckHost(); err != nil {
			testenv.SkipUnlessAllowed(t, "%v", err)
		}
		bin := t.TempDir()
		if err := Build(t.Context(), bin, false, t.Logf); err != nil {
			t.Fatal(err)
		}
		t.Setenv(binEnv, bin)
		var out bytes.Buffer
		err := RunIsolated(t.Context(), []string{"-test.run=^TestSmoke$", "-test.count=1", "-test.v"}, &out, &out)
		t.Logf("in new namespaces:\n%s", out.String())
		if err != nil {
			t.Fatalf("smoke run: %v", err)
		}
		if !strings.Contains(out.String(), "--- PASS: TestSmoke") {
			t.Fatal("the isolated copy did not run TestSmoke")
		}
		return
	}

	start := time.Now()
	rep, err := Run(t.Context(), Config{Smoke: true, BinDir: os.Getenv(binEnv), WorkDir: t.TempDir(), Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("smoke run took %v", time.Since(start).Round(time.Millisecond))

	want := map[string]bool{
		"tsrelay peer relay/TCP throughput a→b":               false,
		"tsrelay peer relay/ping RTT p50":                     false,
		"tsrelay/start → /readyz 200, new identity":           false,
		"tsrelay/start → /readyz 200, existing state":         false,
		"tsrelay/RSS idle (ready, no peers)":                  false,
		"tsrelay/RSS peak, 1 pair(s) sending at once":         false,
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
		// The relay is reachable only at its forwarded (load-balancer)
		// address, the first node's on the world bridge; pod addresses
		// are 10.89.x.y.
		if k == "tsrelay peer relay/TCP throughput a→b" && !strings.Contains(r.Note, "via peer-relay(10.88.") {
			t.Errorf("%s went %q, want via peer-relay(<forwarded address>…)", k, r.Note)
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

// TestParsePing reads ping's per-reply lines, and nothing else.
func TestParsePing(t *testing.T) {
	out := `PING 100.64.0.2 (100.64.0.2) 56(84) bytes of data.
64 bytes from 100.64.0.2: icmp_seq=1 ttl=64 time=1.23 ms
64 bytes from 100.64.0.2: icmp_seq=2 ttl=64 time=0.456 ms
From 100.64.0.1 icmp_seq=3 Destination Host Unreachable

--- 100.64.0.2 ping statistics ---
3 packets transmitted, 2 received, 33% packet loss, time 21ms
rtt min/avg/max/mdev = 0.456/0.843/1.230/0.387 ms
`
	got := parsePing(out)
	if len(got) != 2 || got[0] != 1.23 || got[1] != 0.456 {
		t.Errorf("parsePing = %v, want [1.23 0.456]", got)
	}
}
