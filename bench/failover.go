package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/internal/cmdline"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// Failover cases (issue 20): what happens to the relay a pair of laptops
// rides, and how long the pair is off a relay path afterwards.
const (
	// CaseKill is kill -9 of the relay (an OOM kill, a crashed process).
	CaseKill = "kill"
	// CaseTerm is SIGTERM, as a rolling update or a drain sends it.
	CaseTerm = "term"
	// CaseNode is a node failure: the relay process is stopped (SIGSTOP)
	// and its node's network frozen (iptables DROP in the node namespace),
	// so nothing answers at its address.
	CaseNode = "node"
	// CaseDrain is SIGTERM delivered FailoverDrain after the event: what
	// peers see of a relay that keeps forwarding for that long after its
	// SIGTERM (peers cannot see a pod's readiness, only its packets).
	CaseDrain = "drain"
	// CaseMesh is the meshed DERP region losing the node a DERP-only pair
	// is on (derpmesh.go); not in the smoke run.
	CaseMesh = "mesh"
)

// failoverCases are every case, in the order they run.
var failoverCases = []string{CaseKill, CaseTerm, CaseNode, CaseDrain, CaseMesh}

// ParseFailoverCases checks a comma-separated list of failover cases.
func ParseFailoverCases(s string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		ok := false
		for _, c := range failoverCases {
			ok = ok || c == f
		}
		if !ok {
			return nil, fmt.Errorf("failover case %q is not one of %s", f, strings.Join(failoverCases, ","))
		}
		out = append(out, f)
	}
	return out, nil
}

// caseTitle is a case's name in the report.
func caseTitle(c string, drain time.Duration) string {
	switch c {
	case CaseKill:
		return "kill -9 of the relay in use"
	case CaseTerm:
		return "SIGTERM of the relay in use (rolling update)"
	case CaseNode:
		return "node failure (SIGSTOP + node network dropped)"
	case CaseDrain:
		return fmt.Sprintf("SIGTERM with draining %.0f s", drain.Seconds())
	}
	return c
}

// pingEvery is how often the path watcher starts a disco ping, and
// pingWait how long it waits for its pong. A ping left unanswered that long
// is a moment with neither a relay nor a DERP path.
const (
	pingEvery = 250 * time.Millisecond
	pingWait  = time.Second
)

// Before each event the pair must have ridden one relay for
// failoverStable, and then the event waits a random part of
// failoverSpread: magicsock's discoverUDPRelayPathsInterval, the cycle
// whose phase decides how long a failover takes.
const (
	failoverStable = 5 * time.Second
	failoverSpread = 30 * time.Second
)

// icmpEvery is the interval of the ICMP echo stream through the tunnel
// that keeps the session active, as a user's traffic would (magicsock
// heartbeats and discovers paths only for active sessions).
const icmpEvery = 200 * time.Millisecond

// FailoverTrial is one event and what the pair saw after it. Times are
// seconds from the event.
type FailoverTrial struct {
	Case   string `json:"case"`
	Relays int    `json:"relays"`
	Trial  int    `json:"trial"`
	// From is the relay (its forwarded address) the pair rode at the
	// event; To the one it rode again, empty when it did not within
	// WindowSeconds.
	From string `json:"from"`
	To   string `json:"to,omitempty"`
	// Seconds is from the event to the first pong via To; for CaseDrain
	// from the SIGTERM, FailoverDrain after the event.
	Seconds       float64 `json:"seconds"`
	WindowSeconds float64 `json:"windowSeconds"`
	// DERPSeconds is the time the pongs came via DERP meanwhile;
	// NeitherSeconds the longest stretch of unanswered pings (neither a
	// relay nor DERP), Timeouts how many there were.
	DERPSeconds    float64 `json:"derpSeconds"`
	NeitherSeconds float64 `json:"neitherSeconds"`
	Timeouts       int     `json:"timeouts"`
	// OffRelaySeconds is DERPSeconds plus every unanswered stretch: the
	// time off a relay path.
	OffRelaySeconds float64 `json:"offRelaySeconds"`
	// ICMPGapSeconds is the longest gap between ICMP echo replies through
	// the tunnel (the data path), from the event to the end.
	ICMPGapSeconds float64 `json:"icmpGapSeconds"`
	// For CaseDrain: whether the pair moved to the other relay before the
	// SIGTERM, and when.
	MovedDuringDrain bool    `json:"movedDuringDrain,omitempty"`
	MovedAtSeconds   float64 `json:"movedAtSeconds,omitempty"`
	// OnOtherAtTerm: the pair's last pong before the SIGTERM came via
	// the other relay (it may have moved and come back).
	OnOtherAtTerm bool `json:"onOtherAtTerm,omitempty"`
}

// failoverResult is what the failover section measured.
type failoverResult struct {
	Trials []FailoverTrial
	// Mesh are the meshed DERP region's trials (CaseMesh).
	Mesh   []MeshTrial
	Window time.Duration
	Drain  time.Duration
	Reps   int
	// Seconds is the section's wall time.
	Seconds float64
}

// failoverGroup is one tailnet the section runs its cases on, at the same
// time as the others.
type failoverGroup struct {
	name   string
	relays int
	cases  []string
}

// failoverGroups splits the cases over tailnets that run concurrently: a
// single relay (its node failure on a tailnet of its own), two relays, and
// two relays for the draining case (the longest). They share the machine but each has its own control, relays
// and laptops; pings and restarts use little CPU, and what is measured is
// dominated by magicsock's timers (seconds), not by scheduling.
func (c *Config) failoverGroups() []failoverGroup {
	var one, two, drain []string
	for _, k := range c.FailoverCases {
		switch k {
		case CaseDrain:
			drain = append(drain, k)
		case CaseMesh: // runMeshDERP, on a tailnet of its own
		default:
			one = append(one, k)
			two = append(two, k)
		}
	}
	var gs []failoverGroup
	if c.Smoke {
		// One trial of one case with two relays: enough to keep the
		// harness from rotting.
		if len(two) > 0 {
			gs = append(gs, failoverGroup{name: "f2", relays: 2, cases: two[:1]})
		}
		return gs
	}
	// The lone relay's node failure is the slowest case (a whole window
	// per trial, then the wait until the thawed relay is used again), so
	// it has its own tailnet.
	var oneNode []string
	for i, k := range one {
		if k == CaseNode {
			oneNode, one = []string{k}, append(one[:i:i], one[i+1:]...)
			break
		}
	}
	for _, g := range []failoverGroup{
		{name: "f1", relays: 1, cases: one},
		{name: "f1n", relays: 1, cases: oneNode},
		{name: "f2", relays: 2, cases: two},
		{name: "fd", relays: 2, cases: drain},
	} {
		if len(g.cases) > 0 {
			gs = append(gs, g)
		}
	}
	return gs
}

// runFailover runs the failover section: each group on its own tailnet,
// the groups at once.
func (b *bench) runFailover(ctx context.Context, dir string) (*failoverResult, error) {
	start := time.Now()
	res := &failoverResult{Window: b.cfg.FailoverWindow, Drain: b.cfg.FailoverDrain, Reps: b.cfg.FailoverReps}
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for _, g := range b.cfg.failoverGroups() {
		wg.Go(func() {
			trials, err := b.runFailoverGroup(ctx, filepath.Join(dir, g.name), g)
			mu.Lock()
			defer mu.Unlock()
			res.Trials = append(res.Trials, trials...)
			if err != nil {
				errs = append(errs, fmt.Errorf("%d relay(s): %w", g.relays, err))
			}
		})
	}
	if slices.Contains(b.cfg.FailoverCases, CaseMesh) && !b.cfg.Smoke {
		wg.Go(func() {
			trials, err := b.runMeshDERP(ctx, filepath.Join(dir, "mesh"))
			mu.Lock()
			defer mu.Unlock()
			res.Mesh = trials
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", scMeshDERP, err))
			}
		})
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	return res, errors.Join(errs...)
}

// failoverNet is one group's tailnet: its relays, one pair of laptops that
// cannot go direct, the disco-ping path watcher and the ICMP stream.
type failoverNet struct {
	*tailnet
	g      failoverGroup
	relays []*failoverRelay
	p      *pair
	watch  *pathWatch
	icmp   *tailnettest.Process
}

// failoverRelay is one tsrelay in its own pod, behind its own node, with
// its own static endpoint (a per-pod load balancer's address).
type failoverRelay struct {
	name string
	pod  pod
	dir  string
	r    *tailnettest.Relay
	// frozen: SIGSTOPped and its node's network dropped (CaseNode).
	frozen bool
}

// prefix is how the relay's address starts in a pong's PeerRelay.
func (r *failoverRelay) prefix() string { return r.pod.LB.String() + ":vni:" }

func (b *bench) runFailoverGroup(ctx context.Context, dir string, g failoverGroup) ([]FailoverTrial, error) {
	logf := func(format string, args ...any) {
		b.cfg.Logf("failover, %d relay(s): "+format, append([]any{g.relays}, args...)...)
	}
	tn, err := b.newTailnet(dir)
	if err != nil {
		return nil, err
	}
	defer tn.close()
	fn := &failoverNet{tailnet: tn, g: g}
	defer fn.thawAll()
	for i := range g.relays {
		fr := &failoverRelay{name: fmt.Sprintf("relay-%d", i), dir: filepath.Join(dir, fmt.Sprintf("relay-%d", i))}
		if fr.pod, err = tn.pod(ctx, fmt.Sprintf("%s-r%d", g.name, i), podMTU); err != nil {
			return nil, err
		}
		if err := fn.start(ctx, fr, true); err != nil {
			return nil, err
		}
		fn.relays = append(fn.relays, fr)
	}
	// Restarts come back from saved state, with no auth key, as a pod
	// restarted from its state Secret does (testcontrol otherwise checks
	// the key at every register).
	tn.control.AllowRegisterWithoutKey()
	if fn.p, err = tn.pair(ctx, g.name, false); err != nil {
		return nil, err
	}
	fn.watch = startPathWatch(fn.p)
	defer fn.watch.stop()
	if fn.icmp, err = tailnettest.StartProcess(ctx, tailnettest.ProcessConfig{
		Name:    "ping[" + fn.p.nsA + "]",
		Path:    "ip",
		Args:    []string{"netns", "exec", fn.p.nsA, "ping", "-n", "-D", "-i", strconv.FormatFloat(icmpEvery.Seconds(), 'f', -1, 64), fn.p.ipB.String()},
		LogFile: filepath.Join(dir, "icmp.log"),
	}); err != nil {
		return nil, err
	}
	defer fn.icmp.Close()

	var trials []FailoverTrial
	for _, c := range g.cases {
		reps := b.cfg.FailoverReps
		if b.cfg.Smoke {
			reps = 1
		}
		for i := range reps {
			if ctx.Err() != nil {
				return trials, context.Cause(ctx)
			}
			t, err := fn.trial(ctx, c, i+1)
			if err != nil {
				return trials, fmt.Errorf("%s, trial %d: %w", c, i+1, err)
			}
			logf("%s, trial %d: from %s to %q after %.1f s (DERP %.1f s, off a relay %.1f s, longest without any pong %.1f s, %d timeouts, ICMP gap %.1f s)%s",
				c, i+1, t.From, t.To, t.Seconds, t.DERPSeconds, t.OffRelaySeconds, t.NeitherSeconds, t.Timeouts, t.ICMPGapSeconds, drainNote(t))
			trials = append(trials, t)
		}
	}
	return trials, nil
}

func drainNote(t FailoverTrial) string {
	if t.Case != CaseDrain {
		return ""
	}
	if t.MovedDuringDrain {
		return fmt.Sprintf("; moved during the drain, at %.1f s; on the other relay at the SIGTERM: %v", t.MovedAtSeconds, t.OnOtherAtTerm)
	}
	return "; did not move during the drain"
}

// start starts fr's relay (from its state directory, if any) and waits for
// /readyz 200.
func (fn *failoverNet) start(ctx context.Context, fr *failoverRelay, withKey bool) error {
	r, err := fn.startTSRelay(ctx, fr.pod, fr.dir, withKey, "TS_HOSTNAME="+fr.name)
	if err != nil {
		return err
	}
	fr.r = r
	fn.cleanup(func() {
		if fr.r == r {
			r.Close()
		}
	})
	return waitReadyz(ctx, r)
}

// freeze simulates fr's node failing: the relay process stops and its
// node drops every packet, in and out and forwarded to the pod.
func (fn *failoverNet) freeze(ctx context.Context, fr *failoverRelay) error {
	if err := syscall.Kill(fr.r.Pid(), syscall.SIGSTOP); err != nil {
		return fmt.Errorf("SIGSTOP %s: %w", fr.name, err)
	}
	fr.frozen = true
	return cmdline.Run(ctx, nodeDrop(fr.pod, "-I")...)
}

// thaw undoes freeze.
func (fn *failoverNet) thaw(ctx context.Context, fr *failoverRelay) error {
	if !fr.frozen {
		return nil
	}
	fr.frozen = false
	err := cmdline.Run(ctx, nodeDrop(fr.pod, "-D")...)
	if kerr := syscall.Kill(fr.r.Pid(), syscall.SIGCONT); kerr != nil {
		err = errors.Join(err, fmt.Errorf("SIGCONT %s: %w", fr.name, kerr))
	}
	return err
}

// thawAll thaws every frozen relay, so that closing them does not wait on
// a stopped process.
func (fn *failoverNet) thawAll() {
	for _, fr := range fn.relays {
		fn.thaw(context.Background(), fr)
	}
}

// nodeDrop are the commands that insert (op -I) or delete (-D) the rules
// dropping every packet of p's node.
func nodeDrop(p pod, op string) []string {
	node := p.Netns + "-node"
	var lines []string
	for _, chain := range []string{"INPUT", "FORWARD", "OUTPUT"} {
		lines = append(lines, fmt.Sprintf("ip netns exec %s iptables %s %s -j DROP", node, op, chain))
	}
	return lines
}

// riding waits up to limit until every relay is ready and the pair's pongs
// have all come via one relay for stable, then for a random part of
// spread, and returns the relay the pair rides then; if by then it rides
// none, it waits for that again.
//
// The spread is there because what a trial measures depends on where in
// magicsock's discovery cycle the event falls (relay-path discovery at most
// every 30 s, see README): back-to-back trials would otherwise all hit the
// same phase of it, the one just after the previous trial's discovery.
func (fn *failoverNet) riding(ctx context.Context, limit, stable, spread time.Duration) (*failoverRelay, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for _, fr := range fn.relays {
		if err := waitReadyz(ctx, fr.r); err != nil {
			return nil, err
		}
	}
	var found *failoverRelay
	steady := func() (bool, error) {
		now := time.Now()
		ss := fn.watch.between(now.Add(-stable), now)
		if len(ss) < int(stable/pingEvery)/2 || ss[0].At.Sub(now.Add(-stable)) > 2*pingEvery {
			return false, nil
		}
		found = fn.relayOf(ss[0])
		for _, s := range ss {
			if fn.relayOf(s) != found {
				return false, nil
			}
		}
		return found != nil, nil
	}
	for {
		if err := tailnettest.WaitFor(ctx, 100*time.Millisecond, steady); err != nil {
			s, _ := fn.watch.last()
			return nil, fmt.Errorf("pair never rode one relay for %v (last pong %s): %w", stable, s.describe(), err)
		}
		if spread > 0 {
			select {
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			case <-time.After(rand.N(spread)):
			}
		}
		// The pair may have moved meanwhile (magicsock's path discovery
		// can drop a relay path for DERP for a moment): then wait for it
		// to settle again, within limit, rather than fail the trial.
		s, ok := fn.watch.last()
		if found = fn.relayOf(s); ok && found != nil && time.Since(s.At) <= 2*time.Second {
			return found, nil
		}
	}
}

// relayOf is the relay a sample's pong came through, or nil.
func (fn *failoverNet) relayOf(s pingSample) *failoverRelay {
	if s.Kind != pathRelay {
		return nil
	}
	for _, fr := range fn.relays {
		if strings.HasPrefix(s.Via, fr.prefix()) {
			return fr
		}
	}
	return nil
}

// trial applies case c to the relay the pair rides and measures until the
// pair rides a relay again (the restarted one with a single relay, the
// other with two), then brings the topology back for the next trial.
func (fn *failoverNet) trial(ctx context.Context, c string, n int) (FailoverTrial, error) {
	cfg := fn.cfg
	t := FailoverTrial{Case: c, Relays: len(fn.relays), Trial: n}
	stable, spread := failoverStable, failoverSpread
	if cfg.Smoke || c == CaseDrain || (c == CaseNode && len(fn.relays) == 1) {
		// The drain outlasts the 1-min upgrade discovery whatever its
		// phase, and a lone frozen relay answers in no phase.
		spread = 0
	}
	hit, err := fn.riding(ctx, 2*time.Minute, stable, spread)
	if err != nil {
		return t, err
	}
	t.From = hit.pod.LB.String()
	var other *failoverRelay
	for _, fr := range fn.relays {
		if fr != hit {
			other = fr
		}
	}
	window := cfg.FailoverWindow
	if c == CaseDrain {
		window += cfg.FailoverDrain
	}
	t.WindowSeconds = window.Seconds()

	t0 := time.Now()
	after, err := fn.event(ctx, &t, hit, other, t0)
	if err != nil {
		return t, err
	}
	// Recovered: a pong via the other relay, or via the restarted one,
	// sent after the relay in use stopped (for the drain, after its
	// SIGTERM; Seconds then counts from that).
	target := other
	if target == nil {
		target = hit
	}
	got, err := fn.watch.waitUntil(ctx, after, t0.Add(window), func(s pingSample) bool { return fn.relayOf(s) == target })
	if err != nil {
		return t, err
	}
	end := t0.Add(window)
	if !got.At.IsZero() {
		t.To = target.pod.LB.String()
		t.Seconds = got.At.Sub(t0).Seconds()
		if c == CaseDrain {
			t.Seconds = got.At.Sub(after).Seconds()
		}
		end = got.At
	}
	fn.watch.summarize(&t, t0, end, func(s pingSample) bool { return fn.relayOf(s) != nil })
	t.ICMPGapSeconds = icmpGap(fn.icmp.LogPath(), t0, end)

	// Back to the starting topology: every relay up and ready.
	return t, fn.restore(ctx, t.Case, hit, other)
}

// event applies t's case to hit, the relay the pair rides, at t0 (other
// is the second relay, nil with one), and returns when a pong via a relay
// starts to count as recovery: with a single relay killed or stopped, from
// the moment it was started again; for CaseDrain, from the SIGTERM after
// the drain.
func (fn *failoverNet) event(ctx context.Context, t *FailoverTrial, hit, other *failoverRelay, t0 time.Time) (after time.Time, err error) {
	after = t0
	switch t.Case {
	case CaseKill:
		hit.r.Kill()
	case CaseTerm:
		if err := hit.r.Close(); err != nil {
			return after, fmt.Errorf("SIGTERM %s: %w", hit.name, err)
		}
	case CaseNode:
		if err := fn.freeze(ctx, hit); err != nil {
			return after, err
		}
	case CaseDrain:
		if after, err = fn.drain(ctx, t, hit, other, t0); err != nil {
			return after, err
		}
	}
	if other == nil && (t.Case == CaseKill || t.Case == CaseTerm) {
		// A kubelet or StatefulSet restarts the container at once, from
		// the same state.
		after = time.Now()
		if err := fn.start(ctx, hit, false); err != nil {
			return after, fmt.Errorf("restart %s: %w", hit.name, err)
		}
	}
	return after, nil
}

// drain is CaseDrain's event: nothing for FailoverDrain, watching whether
// the pair leaves hit for other, then SIGTERM of hit, whose time it
// returns.
func (fn *failoverNet) drain(ctx context.Context, t *FailoverTrial, hit, other *failoverRelay, t0 time.Time) (time.Time, error) {
	drain := fn.cfg.FailoverDrain
	if other == nil {
		return t0, errors.New("draining needs two relays")
	}
	// Peers see a draining relay as one that keeps forwarding: do
	// nothing for the drain, but watch whether they leave it.
	moved, err := fn.watch.waitUntil(ctx, t0, t0.Add(drain), func(s pingSample) bool { return fn.relayOf(s) == other })
	if err != nil {
		return t0, err
	}
	if !moved.At.IsZero() {
		t.MovedDuringDrain, t.MovedAtSeconds = true, moved.At.Sub(t0).Seconds()
	}
	// The drain ends, moved or not.
	select {
	case <-ctx.Done():
		return t0, context.Cause(ctx)
	case <-time.After(time.Until(t0.Add(drain))):
	}
	term := time.Now()
	if s, ok := fn.watch.last(); ok && fn.relayOf(s) == other {
		t.OnOtherAtTerm = true
	}
	if err := hit.r.Close(); err != nil {
		return term, fmt.Errorf("SIGTERM %s after the drain: %w", hit.name, err)
	}
	return term, nil
}

// restore brings the topology back after case c hit a relay: a frozen
// relay thawed, a stopped one of two started again (a lone one was
// restarted by event).
func (fn *failoverNet) restore(ctx context.Context, c string, hit, other *failoverRelay) error {
	switch {
	case c == CaseNode:
		return fn.thaw(ctx, hit)
	case other != nil:
		if err := fn.start(ctx, hit, false); err != nil {
			return fmt.Errorf("restart %s: %w", hit.name, err)
		}
	}
	return nil
}

// pingSample is one disco ping of the path watcher.
type pingSample struct {
	At   time.Time // when it was sent
	Kind pathKind  // "" when unanswered
	Via  string    // PeerRelay for a relay pong
	Err  string
}

func (s pingSample) describe() string {
	switch s.Kind {
	case pathRelay:
		return "peer-relay(" + s.Via + ")"
	case "":
		return "none (" + s.Err + ")"
	}
	return string(s.Kind)
}

// pathWatch disco-pings b from a every pingEvery (LocalAPI Ping, as
// `tailscale ping` does) and records which path each pong took.
type pathWatch struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	samples []pingSample
}

func startPathWatch(p *pair) *pathWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &pathWatch{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(pingEvery)
		defer tick.Stop()
		for {
			s := pingSample{At: time.Now()}
			pctx, pcancel := context.WithTimeout(ctx, pingWait)
			r, err := p.a.LocalClient().Ping(pctx, p.ipB, tailcfg.PingDisco)
			pcancel()
			switch {
			case ctx.Err() != nil:
				return
			case err != nil:
				s.Err = err.Error()
			case r.Err != "":
				s.Err = r.Err
			default:
				s.Kind, s.Via = kindOf(r), r.PeerRelay
			}
			w.mu.Lock()
			w.samples = append(w.samples, s)
			w.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

func (w *pathWatch) stop() {
	w.cancel()
	<-w.done
}

func (w *pathWatch) last() (pingSample, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.samples) == 0 {
		return pingSample{}, false
	}
	return w.samples[len(w.samples)-1], true
}

// between returns the samples sent in [from, to).
func (w *pathWatch) between(from, to time.Time) []pingSample {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []pingSample
	for _, s := range w.samples {
		if !s.At.Before(from) && s.At.Before(to) {
			out = append(out, s)
		}
	}
	return out
}

// waitUntil waits for the first sample sent in [from, until) that
// satisfies ok, and returns it, or a zero sample once until has passed.
func (w *pathWatch) waitUntil(ctx context.Context, from, until time.Time, ok func(pingSample) bool) (pingSample, error) {
	seen := 0
	for {
		ss := w.between(from, until)
		for _, s := range ss[seen:] {
			if ok(s) {
				return s, nil
			}
		}
		seen = len(ss)
		// A ping sent just before until is answered up to pingWait later.
		if time.Now().After(until.Add(pingWait + pingEvery)) {
			return pingSample{}, nil
		}
		select {
		case <-ctx.Done():
			return pingSample{}, context.Cause(ctx)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// summarize fills t's DERP, unanswered and off-relay times over the
// samples sent in [from, to): each sample stands for the time until the
// next one.
func (w *pathWatch) summarize(t *FailoverTrial, from, to time.Time, onRelay func(pingSample) bool) {
	ss := w.between(from, to)
	var run float64
	for i, s := range ss {
		next := to
		if i+1 < len(ss) {
			next = ss[i+1].At
		}
		d := next.Sub(s.At).Seconds()
		switch {
		case s.Kind == "":
			t.Timeouts++
			run += d
			t.NeitherSeconds = max(t.NeitherSeconds, run)
			t.OffRelaySeconds += d
			continue
		case s.Kind == pathDERP:
			t.DERPSeconds += d
			t.OffRelaySeconds += d
		case !onRelay(s):
			t.OffRelaySeconds += d
		}
		run = 0
	}
}

// icmpGap returns the longest time without an ICMP echo reply in the
// `ping -D` log at path, between from and to (both ends count: a stream
// with no reply at all in the window has a gap of the whole window).
func icmpGap(path string, from, to time.Time) float64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	last := from
	var gap time.Duration
	for _, l := range strings.Split(string(b), "\n") {
		at, ok := parsePingD(l)
		if !ok || at.Before(from) || !at.Before(to) {
			continue
		}
		gap = max(gap, at.Sub(last))
		last = at
	}
	gap = max(gap, to.Sub(last))
	return gap.Seconds()
}

// parsePingD reads the time of a reply line of `ping -D`:
// "[1733150000.123456] 64 bytes from …: icmp_seq=1 ttl=64 time=1.2 ms".
func parsePingD(l string) (time.Time, bool) {
	if !strings.HasPrefix(l, "[") || !strings.Contains(l, " time=") {
		return time.Time{}, false
	}
	ts, _, ok := strings.Cut(l[1:], "]")
	if !ok {
		return time.Time{}, false
	}
	sec, frac, _ := strings.Cut(ts, ".")
	s, err := strconv.ParseInt(sec, 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	var ns int64
	if frac != "" {
		frac = (frac + "000000000")[:9]
		if ns, err = strconv.ParseInt(frac, 10, 64); err != nil {
			return time.Time{}, false
		}
	}
	return time.Unix(s, ns), true
}

// FailoverCases returns every failover case, in the order they run: the
// default of -failover-cases.
func FailoverCases() []string { return slices.Clone(failoverCases) }
