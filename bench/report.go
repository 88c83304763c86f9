package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// Row is one measurement with its baseline from the same run.
type Row struct {
	Section  string  `json:"section"`  // paths, readiness, footprint
	Scenario string  `json:"scenario"` // e.g. "tsrelay peer relay"
	Metric   string  `json:"metric"`   // e.g. "TCP throughput"
	Unit     string  `json:"unit"`
	Value    float64 `json:"value"`
	// Baseline names the row Value is compared with; empty when this row
	// is itself a baseline or the baseline was not measured (Ratio 0).
	Baseline      string  `json:"baseline,omitempty"`
	BaselineValue float64 `json:"baselineValue,omitempty"`
	Ratio         float64 `json:"ratio,omitempty"` // Value / BaselineValue
	Better        string  `json:"better"`          // "higher" or "lower"
	// IsBaseline marks the rows other rows are compared with.
	IsBaseline bool   `json:"isBaseline,omitempty"`
	Note       string `json:"note,omitempty"`
	// Text, when set, is shown instead of Value: a row with no number to
	// give (e.g. "none within 60 s"); Value is then 0.
	Text string `json:"text,omitempty"`
}

// Report is a run's results.
type Report struct {
	Time    time.Time `json:"time"`
	Smoke   bool      `json:"smoke"`
	Machine Machine   `json:"machine"`
	// TransferSeconds and Pings are the per-path transfer time and ping
	// count.
	TransferSeconds float64  `json:"transferSeconds"`
	Pings           int      `json:"pings"`
	Rounds          int      `json:"rounds"`
	Rows            []Row    `json:"rows"`
	Errors          []string `json:"errors,omitempty"`
	Seconds         float64  `json:"seconds"` // the whole run, build included
	// Failover is every failover trial; FailoverSeconds the section's wall
	// time.
	Failover []FailoverTrial `json:"failover,omitempty"`
	// MeshDERP is every trial of the meshed DERP region (derpmesh.go).
	MeshDERP        []MeshTrial `json:"meshDERP,omitempty"`
	FailoverSeconds float64     `json:"failoverSeconds,omitempty"`
}

// Machine describes where the run happened.
type Machine struct {
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpuModel,omitempty"`
	Kernel    string `json:"kernel,omitempty"`
	GoVersion string `json:"goVersion"`
	// LoadStart and LoadEnd are /proc/loadavg's 1-minute figure at the
	// start and the end of the run: other work on the machine skews every
	// number here.
	LoadStart float64 `json:"loadStart"`
	LoadEnd   float64 `json:"loadEnd"`
}

func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}

func newReport(cfg Config) *Report {
	m := Machine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), LoadStart: loadAvg()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				m.CPUModel = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	return &Report{
		Time:            time.Now().UTC().Truncate(time.Second),
		Smoke:           cfg.Smoke,
		Machine:         m,
		TransferSeconds: cfg.Transfer.Seconds(),
		Pings:           cfg.Pings,
		Rounds:          cfg.Rounds,
	}
}

// add appends a row compared with baseline (skipped when not measured).
func (r *Report) add(row Row, baseline string, bv float64, ok bool) {
	switch {
	case baseline == "":
		row.IsBaseline = true
	case ok && bv > 0:
		row.Baseline, row.BaselineValue, row.Ratio = baseline, bv, row.Value/bv
	default:
		row.Note = strings.TrimPrefix(row.Note+"; baseline "+baseline+" not measured in this run", "; ")
	}
	r.Rows = append(r.Rows, row)
}

func (r *Report) addPaths(res map[string]*pathResult) {
	direct, haveDirect := res[scDirect]
	stock, haveStock := res[scStock]
	relay, haveRelay := res[scRelay]
	for _, sc := range []string{scDirect, scDERP, scRelay, scRelay6, scStock} {
		p, ok := res[sc]
		if !ok {
			continue
		}
		type cmp struct {
			name string
			base *pathResult
			ok   bool
		}
		var cmps []cmp
		switch sc {
		case scDirect:
			cmps = []cmp{{"", nil, false}}
		case scRelay6:
			// The question this row answers is whether IPv6 costs
			// anything over IPv4, through the same relay build.
			cmps = []cmp{{scRelay, relay, haveRelay}}
		case scRelay:
			if haveStock {
				cmps = append(cmps, cmp{scStock, stock, true})
			}
			if haveDirect {
				cmps = append(cmps, cmp{scDirect, direct, true})
			}
			if len(cmps) == 0 {
				cmps = []cmp{{scStock, nil, false}}
			}
		default:
			cmps = []cmp{{scDirect, direct, haveDirect}}
		}
		for _, c := range cmps {
			get := func(f func(*pathResult) float64) float64 {
				if c.base == nil {
					return 0
				}
				return f(c.base)
			}
			note := fmt.Sprintf("via %s; median of %s", p.Via, fmtRuns(p.MbpsRuns))
			if sc == scRelay6 {
				note += fmt.Sprintf("; relay forwarded %.0f packets udp6→udp6, %.0f udp4→udp4", p.Forwarded["udp6→udp6"], p.Forwarded["udp4→udp4"])
			}
			r.add(Row{Section: "paths", Scenario: sc, Metric: "TCP throughput a→b", Unit: "Mbit/s", Value: p.Mbps, Better: "higher", Note: note},
				c.name, get(func(x *pathResult) float64 { return x.Mbps }), c.ok)
			note = fmt.Sprintf("%d ICMP pings through the tailnet", p.Pongs)
			r.add(Row{Section: "paths", Scenario: sc, Metric: "ping RTT p50", Unit: "ms", Value: p.P50, Better: "lower", Note: note},
				c.name, get(func(x *pathResult) float64 { return x.P50 }), c.ok)
			r.add(Row{Section: "paths", Scenario: sc, Metric: "ping RTT p99", Unit: "ms", Value: p.P99, Better: "lower", Note: note},
				c.name, get(func(x *pathResult) float64 { return x.P99 }), c.ok)
		}
	}
}

// addMTU adds the row that compares tsrelay behind a pod link of MTU small
// with tsrelay behind an ordinary one (podMTU).
func (r *Report) addMTU(normal, small *pathResult, mtu int) {
	if small == nil {
		return
	}
	sc := fmt.Sprintf("%s, pod link MTU %d", scRelay, mtu)
	base := fmt.Sprintf("%s, pod link MTU %d", scRelay, podMTU)
	var bm, b50 float64
	if normal != nil {
		bm, b50 = normal.Mbps, normal.P50
	}
	warn := "tsrelay_path_mtu_too_small not exported"
	if small.MTUWarning >= 0 {
		warn = fmt.Sprintf("tsrelay_path_mtu_too_small %g", small.MTUWarning)
	}
	r.add(Row{Section: "mtu", Scenario: sc, Metric: "TCP throughput a→b", Unit: "Mbit/s", Value: small.Mbps, Better: "higher",
		Note: fmt.Sprintf("via %s; median of %s; %s", small.Via, fmtRuns(small.MbpsRuns), warn)}, base, bm, normal != nil)
	r.add(Row{Section: "mtu", Scenario: sc, Metric: "ping RTT p50", Unit: "ms", Value: small.P50, Better: "lower",
		Note: fmt.Sprintf("%d ICMP pings through the tailnet", small.Pongs)}, base, b50, normal != nil)
}

// footName is a relay variant's scenario name in the footprint rows.
func footName(v string) string {
	switch v {
	case scRelay:
		return "tsrelay"
	case scStock:
		return "stock tailscaled relay, GOMAXPROCS=2"
	}
	return strings.Replace(v, " peer relay", " relay", 1)
}

// footBaselines returns what a variant's footprint rows are compared with:
// tsrelay's default with the stock relay on a 16-core node (the goal) and
// on this machine's 2; the stock relay at 16 with itself at 2; every other
// tsrelay variant with tsrelay's default, so that a lever's effect shows.
func footBaselines(v string) []string {
	switch v {
	case scRelay:
		return []string{scStock16, scStock}
	case scStock:
		return []string{""}
	case scStock16:
		return []string{scStock}
	}
	return []string{scRelay}
}

// addLoad adds the relays' memory rows: idle, peak while k pairs send
// through them at once, and what they hold once the traffic has stopped.
func (r *Report) addLoad(res map[string]*pathResult, variants []variant, pairs []int) {
	mib := func(kib int64) float64 { return float64(kib) / 1024 }
	for _, v := range variants {
		p, ok := res[v.name]
		if !ok || v.noLoad {
			continue
		}
		var bases []string
		for _, bn := range footBaselines(v.name) {
			if _, ok := res[bn]; ok || bn == "" {
				bases = append(bases, bn)
			}
		}
		if len(bases) == 0 {
			bases = footBaselines(v.name)[:1] // noted as not measured
		}
		for _, bn := range bases {
			base, haveBase := res[bn]
			value := func(f func(*pathResult) (float64, bool)) (float64, bool) {
				if !haveBase {
					return 0, false
				}
				return f(base)
			}
			bv, bok := value(func(x *pathResult) (float64, bool) { return mib(x.RelayIdleKiB), true })
			r.add(Row{Section: "footprint", Scenario: footName(v.name), Metric: "RSS idle (ready, no peers)", Unit: "MiB", Value: mib(p.RelayIdleKiB), Better: "lower",
				Note: rssParts(p.RelayIdle)}, footBase(bn), bv, bok)
			for _, k := range pairs {
				l, ok := p.Load[k]
				if !ok {
					continue
				}
				bv, bok := value(func(x *pathResult) (float64, bool) { bl, ok := x.Load[k]; return mib(bl.PeakKiB), ok })
				r.add(Row{Section: "footprint", Scenario: footName(v.name), Metric: fmt.Sprintf("RSS peak, %d pair(s) sending at once", k), Unit: "MiB", Value: mib(l.PeakKiB), Better: "lower",
					Note: loadNote(l) + "; " + socketsNote(p)}, footBase(bn), bv, bok)
			}
			if p.RelayAfter != nil {
				bv, bok := value(func(x *pathResult) (float64, bool) { return mib(x.RelayAfter["VmRSS"]), x.RelayAfter != nil })
				r.add(Row{Section: "footprint", Scenario: footName(v.name), Metric: fmt.Sprintf("RSS %.0f s after the load", p.AfterSeconds), Unit: "MiB", Value: mib(p.RelayAfter["VmRSS"]), Better: "lower",
					Note: rssParts(p.RelayAfter)}, footBase(bn), bv, bok)
			}
		}
	}
}

// footBase is the footprint name of baseline variant bn ("" for none).
func footBase(bn string) string {
	if bn == "" {
		return ""
	}
	return footName(bn)
}

// addSockets adds the rows that show what each socket count costs in
// relayed throughput: tsrelay's default against itself at 16 sockets (the
// goal: at least 0.95×), every other variant against its default.
func (r *Report) addSockets(res map[string]*pathResult, variants []variant) {
	for _, v := range variants {
		p, ok := res[v.name]
		if !ok || v.noLoad {
			continue // the IPv6 row is compared in the paths section
		}
		bn := scRelay
		switch v.name {
		case scRelay:
			bn = scRelay16
		case scStock:
			continue // a baseline; its throughput is in the paths section
		case scStock16:
			bn = scStock
		}
		base, haveBase := res[bn]
		if !haveBase {
			continue // nothing to compare with (a smoke run); the paths section has the value
		}
		r.add(Row{Section: "sockets", Scenario: v.name, Metric: "TCP throughput a→b", Unit: "Mbit/s", Value: p.Mbps, Better: "higher",
			Note: fmt.Sprintf("%s; median of %s", socketsNote(p), fmtRuns(p.MbpsRuns))}, bn, base.Mbps, true)
	}
}

// socketsNote says how many UDP sockets the relay had bound on its port.
func socketsNote(p *pathResult) string {
	return fmt.Sprintf("%d+%d sockets (IPv4+IPv6)", p.Sockets.IPv4, p.Sockets.IPv6)
}

// rssParts says what an RSS figure is made of: anonymous memory (heap,
// stacks) and file pages (the executable's code and data).
func rssParts(m map[string]int64) string {
	return fmt.Sprintf("anonymous %.1f MiB, file %.1f MiB", float64(m["RssAnon"])/1024, float64(m["RssFile"])/1024)
}

func loadNote(l load) string {
	return fmt.Sprintf("%.0f Mbit/s in all; relay CPU %.2f s per GB relayed", l.Mbps, l.CPUPerGB)
}

// addAbuse adds a footprint row per HTTP-abuse case: the relay's extra RSS
// while the connections are open.
func (r *Report) addAbuse(res []abuseResult) {
	for _, a := range res {
		size := fmt.Sprintf("%d KiB", a.HeaderBytes>>10)
		if a.HeaderBytes >= 1<<20 {
			size = fmt.Sprintf("%d MiB", a.HeaderBytes>>20)
		}
		note := fmt.Sprintf("idle %.1f MiB, peak %.1f MiB; goal < 32 MiB extra at 1,000 connections; ", float64(a.IdleKiB)/1024, float64(a.PeakKiB)/1024)
		if a.Healthz >= 0 {
			note += fmt.Sprintf("/healthz answered in %.0f ms meanwhile", a.Healthz*1000)
		} else {
			note += "/healthz did NOT answer meanwhile"
		}
		// No baseline: the stock relay has no HTTP port.
		r.Rows = append(r.Rows, Row{Section: "footprint", Scenario: "tsrelay", Unit: "MiB", Better: "lower", Note: note,
			Metric: fmt.Sprintf("HTTP port abuse: %d connections × %s unfinished header → extra RSS", a.Conns, size),
			Value:  float64(a.PeakKiB-a.IdleKiB) / 1024})
	}
}

// WriteMarkdown writes the report as Markdown tables.
func (r *Report) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	mode := "full"
	if r.Smoke {
		mode = "smoke"
	}
	fmt.Fprintf(&b, "# tsrelay benchmark (%s run)\n\n", mode)
	fmt.Fprintf(&b, "%s; %d CPUs (%s); Linux %s; %s; tailscale.com %s; %d × %.0f s iperf3 TCP transfers and %d ICMP pings per path; %d readiness rounds; run took %.0f s; load average (1 min) %.2f at the start, %.2f at the end.\n\n",
		r.Time.Format(time.RFC3339), r.Machine.CPUs, r.Machine.CPUModel, r.Machine.Kernel, r.Machine.GoVersion, tailscaleVersion(), r.Rounds, r.TransferSeconds, r.Pings, r.Rounds, r.Seconds, r.Machine.LoadStart, r.Machine.LoadEnd)
	b.WriteString("Laptops: kernel-TUN tailscaled, each in its own network namespace on one bridge. Relays: in a pod namespace behind a node namespace that forwards their UDP port (DNAT) and masquerades their traffic, reached only at that forwarded address. " +
		"Tailscale's test control/DERP/STUN in the harness process. Ratio = value / baseline value from the same run; `better` says which way is good.\n")
	sections := []struct{ key, title string }{
		{"paths", "Paths: laptop a → laptop b"},
		{"mtu", "Pod network MTU: relayed packets that do not fit"},
		{"readiness", "Readiness"},
		{"sockets", "Relay sockets: relayed throughput by socket count"},
		{"footprint", "Footprint"},
		{"derp", "DERP: first pong between laptops that cannot go direct; the relay with its DERP server on"},
		{"failover", "Failover: losing the relay a pair rides, one relay against two"},
		{"abuse", "Abuse: strangers at the DERP port, junk at the relay's UDP port and STUN"},
	}
	for _, s := range sections {
		fmt.Fprintf(&b, "\n## %s\n\n", s.title)
		if s.key == "failover" {
			b.WriteString(r.failoverHeader())
		}
		b.WriteString("| Scenario | Metric | Value | Baseline | Baseline value | Ratio | Better | Note |\n")
		b.WriteString("|---|---|---:|---|---:|---:|---|---|\n")
		n := 0
		for _, row := range r.Rows {
			if row.Section != s.key {
				continue
			}
			n++
			base, bv, ratio := "—", "", ""
			if row.IsBaseline {
				base = "(is a baseline)"
			}
			if row.Baseline != "" {
				base, bv, ratio = row.Baseline, fmtVal(row.BaselineValue, row.Unit), fmt.Sprintf("%.2f×", row.Ratio)
			}
			val := fmtVal(row.Value, row.Unit)
			if row.Text != "" {
				val = row.Text
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s |\n",
				row.Scenario, row.Metric, val, base, bv, ratio, row.Better, row.Note)
		}
		if n == 0 {
			b.WriteString("| (not measured in this run) | | | | | | | |\n")
		}
	}
	if len(r.Errors) > 0 {
		b.WriteString("\n## Errors\n\n")
		for _, e := range r.Errors {
			fmt.Fprintf(&b, "- %s\n", strings.ReplaceAll(e, "\n", " "))
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func fmtRuns(xs []float64) string {
	var parts []string
	for _, x := range xs {
		parts = append(parts, fmt.Sprintf("%.0f", x))
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

func fmtVal(v float64, unit string) string {
	switch unit {
	case "ms":
		return fmt.Sprintf("%.3f %s", v, unit)
	case "s":
		return fmt.Sprintf("%.2f %s", v, unit)
	}
	return fmt.Sprintf("%.1f %s", v, unit)
}

// tailscaleVersion is the tailscale.com module version linked into this
// program (the one go.mod pins for the relay and the laptops).
func tailscaleVersion() string {
	if v := tailscaleModVersion(); v != "" {
		return v
	}
	return "(unknown)"
}

// WriteFiles writes <dir>/<stamp>.md and .json and returns their paths.
func (r *Report) WriteFiles(dir string) (md, js string, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	stamp := r.Time.Format("20060102T150405Z")
	if r.Smoke {
		stamp = "smoke-" + stamp
	}
	md = filepath.Join(dir, stamp+".md")
	js = filepath.Join(dir, stamp+".json")
	f, err := os.Create(md)
	if err != nil {
		return "", "", err
	}
	if err := r.WriteMarkdown(f); err != nil {
		f.Close()
		return "", "", err
	}
	if err := f.Close(); err != nil {
		return "", "", err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", "", err
	}
	return md, js, os.WriteFile(js, append(b, '\n'), 0o644)
}

func tailscaleModVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	for _, d := range bi.Deps {
		if d.Path == "tailscale.com" {
			return d.Version
		}
	}
	return ""
}
