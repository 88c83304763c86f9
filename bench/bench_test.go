package bench

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
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
// address), tsrelay readiness, RSS, binary sizes, one failover trial (kill
// -9 with two relays: the pair must reach the other), and the Markdown and
// JSON output.
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
		"tsrelay peer relay/TCP throughput a→b":                                  false,
		"tsrelay peer relay/ping RTT p50":                                        false,
		"tsrelay/start → /readyz 200, new identity":                              false,
		"tsrelay/start → /readyz 200, existing state":                            false,
		"tsrelay/RSS idle (ready, no peers)":                                     false,
		"tsrelay/RSS peak, 1 pair(s) sending at once":                            false,
		"tsrelay/stripped binary size (relay)":                                   false,
		"stock/stripped binary size (tailscaled + tailscale)":                    false,
		"2 relays: kill -9 of the relay in use/event → pings ride a relay again": false,
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
	// One kill -9 with two relays: the pair must end up on the other one.
	if len(rep.Failover) != 1 {
		t.Errorf("failover trials = %d, want 1", len(rep.Failover))
	}
	for _, f := range rep.Failover {
		if f.To == "" || f.To == f.From || !strings.HasPrefix(f.To, "10.88.") {
			t.Errorf("failover trial went from %q to %q, want to the other relay's forwarded address", f.From, f.To)
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

// TestParsePingD reads the time of `ping -D` reply lines, and only those.
func TestParsePingD(t *testing.T) {
	for _, tc := range []struct {
		line string
		want time.Time
		ok   bool
	}{
		{"[1733150000.123456] 64 bytes from 100.64.0.2: icmp_seq=1 ttl=64 time=1.2 ms", time.Unix(1733150000, 123456000), true},
		{"[1733150001.5] 64 bytes from 100.64.0.2: icmp_seq=2 ttl=64 time=0.9 ms", time.Unix(1733150001, 500000000), true},
		{"[1733150002.000001] From 100.64.0.1 icmp_seq=3 Destination Host Unreachable", time.Time{}, false},
		{"PING 100.64.0.2 (100.64.0.2) 56(84) bytes of data.", time.Time{}, false},
	} {
		got, ok := parsePingD(tc.line)
		if ok != tc.ok || !got.Equal(tc.want) {
			t.Errorf("parsePingD(%q) = %v, %v, want %v, %v", tc.line, got, ok, tc.want, tc.ok)
		}
	}
}

// TestIcmpGap finds the longest stretch without a reply, the window's ends
// included.
func TestIcmpGap(t *testing.T) {
	log := "[100.0] 64 bytes from x: icmp_seq=1 ttl=64 time=1 ms\n" +
		"[100.2] 64 bytes from x: icmp_seq=2 ttl=64 time=1 ms\n" +
		"[103.7] 64 bytes from x: icmp_seq=19 ttl=64 time=1 ms\n" +
		"[103.9] 64 bytes from x: icmp_seq=20 ttl=64 time=1 ms\n"
	p := filepath.Join(t.TempDir(), "icmp.log")
	if err := os.WriteFile(p, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		from, to float64
		want     float64
	}{
		{100.1, 104, 3.5},   // 100.2 → 103.7
		{100.1, 100.9, 0.7}, // 100.2 → the end
		{104, 106, 2},       // no reply at all
	} {
		from, to := time.Unix(0, int64(tc.from*1e9)), time.Unix(0, int64(tc.to*1e9))
		if got := icmpGap(p, from, to); math.Abs(got-tc.want) > 1e-6 {
			t.Errorf("icmpGap(%v, %v) = %v, want %v", tc.from, tc.to, got, tc.want)
		}
	}
}

// TestSummarize adds up DERP and unanswered time, each sample standing for
// the time until the next.
func TestSummarize(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	w := &pathWatch{samples: []pingSample{
		{At: at(-1), Kind: pathRelay, Via: "10.88.0.3:40000:vni:1"},
		{At: at(0), Err: "timeout"},
		{At: at(1), Err: "timeout"},
		{At: at(2), Kind: pathDERP},
		{At: at(2.5), Kind: pathDERP},
		{At: at(3), Err: "timeout"},
		{At: at(4), Kind: pathRelay, Via: "10.88.0.4:40000:vni:2"},
	}}
	var tr FailoverTrial
	w.summarize(&tr, t0, at(4), func(s pingSample) bool { return s.Kind == pathRelay })
	if tr.Timeouts != 3 || tr.NeitherSeconds != 2 || tr.DERPSeconds != 1 || tr.OffRelaySeconds != 4 {
		t.Errorf("summarize = %d timeouts, neither %v s, DERP %v s, off relay %v s; want 3, 2, 1, 4",
			tr.Timeouts, tr.NeitherSeconds, tr.DERPSeconds, tr.OffRelaySeconds)
	}
}
