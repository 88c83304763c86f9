package bench

import (
	"fmt"
	"strings"
	"time"
)

// failoverTopology names a relay count in the report.
func failoverTopology(relays int) string {
	if relays == 1 {
		return "1 relay"
	}
	return fmt.Sprintf("%d relays", relays)
}

// failoverMetric is one figure of a trial the report summarizes.
type failoverMetric struct {
	name string
	// get returns the figure, and false when the trial has none (it did
	// not reach a relay again within its window).
	get func(FailoverTrial) (float64, bool)
}

var failoverMetrics = []failoverMetric{
	{"event → pings ride a relay again", func(t FailoverTrial) (float64, bool) { return t.Seconds, t.To != "" }},
	{"time off a relay path (DERP or no pong)", func(t FailoverTrial) (float64, bool) { return t.OffRelaySeconds, true }},
	{"time on DERP", func(t FailoverTrial) (float64, bool) { return t.DERPSeconds, true }},
	{"longest moment with neither a relay nor a DERP pong", func(t FailoverTrial) (float64, bool) { return t.NeitherSeconds, true }},
	{"longest gap between ICMP replies (data path)", func(t FailoverTrial) (float64, bool) { return t.ICMPGapSeconds, t.ICMPGapSeconds >= 0 }},
}

// addFailover adds the failover rows: per case and topology, the median of
// each figure over the trials (the max and the trial count in the note),
// two relays compared with one in the same run, and draining compared with
// a plain SIGTERM with two relays. The meshed-DERP rows follow them
// (addMeshDERP).
func (r *Report) addFailover(res *failoverResult) {
	if res == nil {
		return
	}
	r.Failover = res.Trials
	r.FailoverSeconds = res.Seconds
	defer r.addMeshDERP(res.Mesh)
	by := map[string][]FailoverTrial{}
	for _, t := range res.Trials {
		k := t.Case + "/" + failoverTopology(t.Relays)
		by[k] = append(by[k], t)
	}
	scenario := func(c string, relays int) string {
		return failoverTopology(relays) + ": " + caseTitle(c, res.Drain)
	}
	for _, c := range failoverCases {
		for _, relays := range []int{1, 2} {
			ts := by[c+"/"+failoverTopology(relays)]
			if len(ts) == 0 {
				continue
			}
			for _, m := range failoverMetrics {
				row := Row{Section: "failover", Scenario: scenario(c, relays), Metric: m.name, Unit: "s", Better: "lower"}
				med, mx, n := summarizeTrials(ts, m.get)
				row.Value = med
				row.Note = fmt.Sprintf("median of %d trials, max %.1f s", n, mx)
				if n < len(ts) {
					row.Note = fmt.Sprintf("median of the %d of %d trials that reached a relay again within %.0f s, max %.1f s", n, len(ts), ts[0].WindowSeconds, mx)
				}
				if n == 0 {
					row.Value = 0
					row.Text = fmt.Sprintf("none within %.0f s", ts[0].WindowSeconds)
					row.Note = fmt.Sprintf("%d trials: no relay path within the window", len(ts))
					if relays == 1 && c == CaseNode {
						row.Note += " (a lone relay on a lost node comes back only after eviction, about 5 min, and the next pod start)"
					}
				}
				row.Note += failoverNote(c, relays, m, ts, res.Drain)
				base, baseName := []FailoverTrial(nil), ""
				switch {
				case c == CaseDrain:
					base, baseName = by[CaseTerm+"/"+failoverTopology(relays)], scenario(CaseTerm, relays)
				case relays == 2:
					base, baseName = by[c+"/"+failoverTopology(1)], scenario(c, 1)
				}
				if baseName == "" {
					r.add(row, "", 0, false)
					continue
				}
				bmed, _, bn := summarizeTrials(base, m.get)
				switch {
				case n > 0 && bn > 0 && bmed > 0:
					r.add(row, baseName, bmed, true)
				case len(base) > 0 && bn == 0:
					row.Note += fmt.Sprintf("; %s: none within %.0f s", baseName, base[0].WindowSeconds)
					r.Rows = append(r.Rows, row)
				case len(base) > 0:
					row.Note += fmt.Sprintf("; %s: %.2f s", baseName, bmed)
					r.Rows = append(r.Rows, row)
				default:
					r.add(row, baseName, 0, false)
				}
			}
		}
	}
}

// failoverNote adds what a metric's row should say beyond its figures:
// which relay the pair went to, how many trials had a moment with no pong
// at all, whether draining moved the pair, and the goals.
func failoverNote(c string, relays int, m failoverMetric, ts []FailoverTrial, drain time.Duration) string {
	var b strings.Builder
	switch m.name {
	case failoverMetrics[0].name:
		same := 0
		for _, t := range ts {
			if t.To != "" && t.To == t.From {
				same++
			}
		}
		if relays > 1 {
			fmt.Fprintf(&b, "; to the other relay in %d of %d", countTrials(ts, func(t FailoverTrial) bool { return t.To != "" && t.To != t.From }), len(ts))
		} else if same > 0 {
			fmt.Fprintf(&b, "; to the restarted relay in %d of %d", same, len(ts))
		}
		if c == CaseDrain {
			fmt.Fprintf(&b, "; counted from the SIGTERM, %.0f s after the event (the other figures from the event)", drain.Seconds())
			moved := countTrials(ts, func(t FailoverTrial) bool { return t.MovedDuringDrain })
			fmt.Fprintf(&b, "; moved to the other relay during the drain in %d of %d", moved, len(ts))
			for _, t := range ts {
				if t.MovedDuringDrain {
					fmt.Fprintf(&b, " (at %.1f s)", t.MovedAtSeconds)
				}
			}
			fmt.Fprintf(&b, "; still on it at the SIGTERM in %d of %d", countTrials(ts, func(t FailoverTrial) bool { return t.OnOtherAtTerm }), len(ts))
		}
		if relays == 2 && c == CaseNode {
			_, mx, n := summarizeTrials(ts, m.get)
			fmt.Fprintf(&b, "; goal < 40 s with two relays: %s", metOrNot(n == len(ts) && mx < 40))
		}
	case failoverMetrics[1].name:
		if relays == 2 && c == CaseNode {
			_, mx, _ := summarizeTrials(ts, m.get)
			fmt.Fprintf(&b, "; goal < 40 s with two relays: %s", metOrNot(mx < 40))
		}
	case failoverMetrics[3].name:
		k := countTrials(ts, func(t FailoverTrial) bool { return t.Timeouts > 0 })
		fmt.Fprintf(&b, "; a disco ping went unanswered (%v) in %d of %d trials (goal: never)", pingWait, k, len(ts))
	}
	return b.String()
}

func metOrNot(ok bool) string {
	if ok {
		return "met"
	}
	return "not met"
}

func countTrials(ts []FailoverTrial, f func(FailoverTrial) bool) int {
	n := 0
	for _, t := range ts {
		if f(t) {
			n++
		}
	}
	return n
}

// summarizeTrials returns the median and max of a figure over the trials
// that have it, and how many do.
func summarizeTrials(ts []FailoverTrial, get func(FailoverTrial) (float64, bool)) (med, mx float64, n int) {
	var xs []float64
	for _, t := range ts {
		if v, ok := get(t); ok {
			xs = append(xs, v)
			mx = max(mx, v)
		}
	}
	return percentile(xs, 50), mx, len(xs)
}

// failoverHeader is the failover section's first paragraph in Markdown.
func (r *Report) failoverHeader() string {
	if r.FailoverSeconds == 0 {
		return ""
	}
	return fmt.Sprintf("Two NATed laptops that cannot go direct disco-ping each other every %v (LocalAPI Ping, as `tailscale ping`; a pong not back within %v is a moment with neither path) while an ICMP stream every %v keeps the session active; the event hits the relay the pair rides. One relay is restarted at once from its state (kill, SIGTERM) or stays frozen (node failure); with two, the pair must reach the other. The single-relay, two-relay and draining tailnets run at the same time; the section took %.0f s. Per-trial figures are in the JSON (`failover`).\n\n",
		pingEvery, pingWait, icmpEvery, r.FailoverSeconds)
}
