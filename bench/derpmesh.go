package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/cmdline"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// scMeshDERP is the meshed in-cluster DERP region: two tsrelay DERP nodes
// of one region (TS_DERP_MESH_FILE, TS_DERP_MESH_PEERS), as two replicas of
// the HA install serve it.
const scMeshDERP = "meshed in-cluster DERP, 2 nodes"

// MeshTrial is one stop of a node of the meshed region.
type MeshTrial struct {
	Trial int `json:"trial"`
	// Event is "kill" (kill -9 of the node's relay) or "node" (a node
	// failure: the relay SIGSTOPped and its node's network dropped, as in
	// CaseNode).
	Event string `json:"event"`
	// Stopped is the derpMap name of the node stopped (kill -9): the one
	// the pair was connected to.
	Stopped string `json:"stopped"`
	// Seconds is from the stop until a's disco pings to b, which can only
	// go via DERP, are answered again; Via is how that pong came. -1 when
	// they were not within WindowSeconds.
	Seconds       float64 `json:"seconds"`
	WindowSeconds float64 `json:"windowSeconds"`
	Via           string  `json:"via"`
	// Timeouts are the pings unanswered meanwhile.
	Timeouts int `json:"timeouts"`
	// AcrossSeconds is, once the stopped node is back and meshed again,
	// how long a fresh laptop c took from its first disco ping to its
	// first pong from b. c connects to the region's first node; when that
	// is the node that was stopped, b is on the other one and the pong
	// crossed the mesh (Across).
	AcrossSeconds float64 `json:"acrossSeconds"`
	Across        bool    `json:"across"`
}

// meshNode is one relay serving a node of the meshed region.
type meshNode struct {
	name string // derpMap node name, 900a, 900b
	pod  pod
	dir  string
	r    *tailnettest.Relay
	env  []string
}

// runMeshDERP runs the meshed-DERP trials: two relays in their own pods
// serve one region, meshed; two laptops that can reach each other only via
// DERP are homed on it; each trial kills the node they are connected to,
// times until a reaches b again, restarts it, and times a fresh laptop's
// first pong to b.
func (b *bench) runMeshDERP(ctx context.Context, dir string) ([]MeshTrial, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	mn, err := b.newMeshNet(ctx, dir)
	if err != nil {
		return nil, err
	}
	defer mn.close()

	var trials []MeshTrial
	reps := b.cfg.FailoverReps
	if b.cfg.Smoke {
		reps = 1
	}
	// Every client dials the region's first node that answers, and stays
	// there: at first both laptops are on 900a; once it is stopped they
	// move to 900b, and stay when 900a is back. So the trials stop 900a,
	// 900b, 900a, …: each time the node the pair is on. First reps kills,
	// then reps node failures.
	for i := range 2 * reps {
		ev := meshKill
		if i >= reps {
			ev = meshFreeze
		}
		t, err := mn.trial(ctx, i, ev)
		if err != nil {
			return trials, err
		}
		b.cfg.Logf("%s trial %d: %s of %s; a reached b again after %.2f s via %s (%d pings unanswered); fresh laptop's first pong to b after %.3f s (across the mesh: %v)",
			scMeshDERP, t.Trial, t.Event, t.Stopped, t.Seconds, t.Via, t.Timeouts, t.AcrossSeconds, t.Across)
		trials = append(trials, t)
	}
	return trials, nil
}

// meshNet is the meshed-DERP tailnet: the region's two nodes, and the pair
// homed on it with its path watcher.
type meshNet struct {
	*tailnet
	nodes []*meshNode
	pair  *pair
	watch *pathWatch
}

// close stops the watcher and undoes the tailnet.
func (mn *meshNet) close() {
	mn.watch.stop()
	mn.tailnet.close()
}

// newMeshNet starts the region's two nodes, each a relay in its own pod
// whose node forwards DERP and STUN too, meshed through one shared file, on
// a tailnet whose derpMap has only that region; then a pair of laptops
// homed on it, answered via DERP, and the watcher of their path.
func (b *bench) newMeshNet(ctx context.Context, dir string) (_ *meshNet, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	// The region's shared state, made where the relays read it, so that
	// the derpMap can pin its certificate before they start.
	sharedFile := filepath.Join(dir, "mesh.json")
	shared, err := derpregion.LoadSharedFile(sharedFile, time.Now())
	if err != nil {
		return nil, fmt.Errorf("mesh shared state: %w", err)
	}
	mn := &meshNet{tailnet: &tailnet{bench: b, dir: dir}}
	defer func() {
		if err != nil {
			mn.tailnet.close()
		}
	}()
	var members []derpregion.Member
	var peers []string
	for i := range 2 {
		n := &meshNode{name: fmt.Sprintf("%d%c", derpregion.DefaultRegionID, 'a'+i), dir: filepath.Join(dir, fmt.Sprintf("relay-%d", i))}
		if n.pod, err = mn.pod(ctx, fmt.Sprintf("mesh-r%d", i), podMTU); err != nil {
			return nil, err
		}
		if err := forwardDERP(ctx, n.pod); err != nil {
			return nil, err
		}
		mn.nodes = append(mn.nodes, n)
		members = append(members, derpregion.Member{Addrs: []netip.Addr{n.pod.LB.Addr()}})
		peers = append(peers, netip.AddrPortFrom(n.pod.LB.Addr(), derpPort).String())
	}
	region, err := derpregion.Region(derpregion.RegionOptions{
		RegionID: derpregion.DefaultRegionID, RegionCode: derpregion.DefaultRegionCode, Cert: shared.Cert,
		Members: members, DERPPort: derpPort, STUNPort: stunPort,
	})
	if err != nil {
		return nil, err
	}
	// No relay grant: a pair that cannot go direct then has DERP alone,
	// so what brings it back is the region, not a peer relay.
	c, err := tailnettest.StartControlWith(worldGateway, nil, tailnettest.ControlOptions{
		Delay: wanDelay, Regions: []*tailcfg.DERPRegion{region}, NoRelayGrants: true,
	})
	if err != nil {
		return nil, err
	}
	mn.control = c
	mn.cleanup(c.Close)
	for i, n := range mn.nodes {
		n.env = []string{
			"TS_HOSTNAME=mesh-" + strconv.Itoa(i),
			"TS_DERP_PORT=" + strconv.Itoa(derpPort), "TS_STUN_PORT=" + strconv.Itoa(stunPort),
			"TS_DERP_MESH_FILE=" + sharedFile, "TS_DERP_MESH_PEERS=" + strings.Join(peers, ","),
		}
		if err := mn.startMeshNode(ctx, n, true); err != nil {
			return nil, err
		}
	}
	if err := mn.waitAllMeshed(ctx); err != nil {
		return nil, err
	}
	c.AllowRegisterWithoutKey() // restarts come back from their state
	if mn.pair, err = mn.tailnet.pair(ctx, "mesh", false); err != nil {
		return nil, err
	}
	if err := waitHome(ctx, mn.pair, derpregion.DefaultRegionCode); err != nil {
		return nil, err
	}
	if _, err := firstPongOf(ctx, mn.pair); err != nil {
		return nil, err
	}
	mn.watch = startPathWatch(mn.pair)
	return mn, nil
}

// waitAllMeshed waits until each node is meshed with the other.
func (mn *meshNet) waitAllMeshed(ctx context.Context) error {
	for _, n := range mn.nodes {
		if err := waitMeshed(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// trial is the meshed region's trial i (from 0): ev (meshKill or
// meshFreeze) stops the node the pair is on, the time until a's pings to b
// are answered again is taken, and the node comes back from its state;
// after a kill a fresh laptop times its first pong to b.
func (mn *meshNet) trial(ctx context.Context, i int, ev string) (MeshTrial, error) {
	n := mn.nodes[i%len(mn.nodes)]
	t := MeshTrial{Trial: i + 1, Event: ev, Stopped: n.name}
	w, window := mn.watch, mn.cfg.FailoverWindow
	// The pair is answered now, before the stop.
	if _, err := w.waitUntil(ctx, time.Now(), time.Now().Add(10*time.Second), func(s pingSample) bool { return s.Kind == pathDERP }); err != nil {
		return t, err
	}
	var t0 time.Time
	if t.Event == meshKill {
		n.r.Kill()
		<-n.r.Done()
		t0 = time.Now()
	} else {
		t0 = time.Now()
		if err := freezeMeshNode(ctx, n); err != nil {
			return t, err
		}
	}
	s, err := w.waitUntil(ctx, t0, t0.Add(window), func(s pingSample) bool { return s.Kind != "" })
	if err != nil {
		return t, err
	}
	end := s.At
	if s.Kind == "" {
		t.Seconds, end = -1, t0.Add(window)
	} else {
		t.Seconds, t.Via = s.At.Sub(t0).Seconds(), s.describe()
	}
	t.WindowSeconds = window.Seconds()
	for _, x := range w.between(t0, end) {
		if x.Kind == "" {
			t.Timeouts++
		}
	}
	if t.Event == meshFreeze {
		// The node comes back as a new pod would: the frozen process
		// goes (thawed first, so that it can die), a new one starts.
		if err := thawMeshNode(ctx, n); err != nil {
			return t, err
		}
		n.r.Kill()
		<-n.r.Done()
	}
	// Back, and meshed with the other node again.
	if err := mn.startMeshNode(ctx, n, false); err != nil {
		return t, err
	}
	if err := mn.waitAllMeshed(ctx); err != nil {
		return t, err
	}
	if t.Event == meshKill {
		fp, err := mn.freshPong(ctx, i)
		if err != nil {
			return t, fmt.Errorf("trial %d: fresh laptop to b: %w", i+1, err)
		}
		t.AcrossSeconds, t.Across = fp.Seconds, n == mn.nodes[0]
	}
	return t, nil
}

// freshPong starts a fresh laptop, which connects to 900a, and times its
// first pong from b, which is on the node trial i did not stop.
func (mn *meshNet) freshPong(ctx context.Context, i int) (firstPong, error) {
	p := mn.pair
	cl, _, err := mn.laptop(ctx, fmt.Sprintf("meshc%d", i), false)
	if err != nil {
		return firstPong{}, err
	}
	cp := &pair{a: cl, b: p.b, ipB: p.ipB}
	if err := cl.WaitForPeer(ctx, p.ipB); err != nil {
		return firstPong{}, err
	}
	if err := waitHome(ctx, cp, derpregion.DefaultRegionCode); err != nil {
		return firstPong{}, err
	}
	return firstPongOf(ctx, cp)
}

// Events of the meshed-DERP trials.
const (
	meshKill   = "kill"
	meshFreeze = "node"
)

// freezeMeshNode simulates n's node failing, as CaseNode does: the relay
// stops (SIGSTOP) and its node drops every packet.
func freezeMeshNode(ctx context.Context, n *meshNode) error {
	if err := syscall.Kill(n.r.Pid(), syscall.SIGSTOP); err != nil {
		return fmt.Errorf("SIGSTOP %s: %w", n.name, err)
	}
	return cmdline.Run(ctx, nodeDrop(n.pod, "-I")...)
}

// thawMeshNode undoes freezeMeshNode.
func thawMeshNode(ctx context.Context, n *meshNode) error {
	err := cmdline.Run(ctx, nodeDrop(n.pod, "-D")...)
	return errors.Join(err, syscall.Kill(n.r.Pid(), syscall.SIGCONT))
}

// startMeshNode starts n's relay from its state directory and waits until
// it is ready.
func (tn *tailnet) startMeshNode(ctx context.Context, n *meshNode, withKey bool) error {
	r, err := tn.startTSRelay(ctx, n.pod, n.dir, withKey, n.env...)
	if err != nil {
		return err
	}
	n.r = r
	tn.cleanup(func() { r.Close() })
	return waitReadyz(ctx, r)
}

// waitMeshed waits until n's relay reports its mesh link to the other node
// up (tsrelay_derp_mesh_peer_connected).
func waitMeshed(ctx context.Context, n *meshNode) error {
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var v float64
	err := tailnettest.WaitFor(wctx, 100*time.Millisecond, func() (bool, error) {
		fams, err := n.r.Metrics(wctx)
		if err != nil {
			return false, nil // restarting
		}
		v, _ = tailnettest.MetricSum(fams, "tsrelay_derp_mesh_peer_connected")
		return v >= 1, nil
	})
	if err != nil {
		return fmt.Errorf("%s: mesh link never up (tsrelay_derp_mesh_peer_connected %v): %w\n%s", n.name, v, err, n.r.LogTail(20))
	}
	return nil
}

// addMeshDERP adds the meshed-DERP rows to the failover section.
func (r *Report) addMeshDERP(trials []MeshTrial) {
	if len(trials) == 0 {
		return
	}
	r.MeshDERP = trials
	const sec = "failover"
	for _, ev := range []struct{ event, title string }{
		{meshKill, "kill -9 of the node a pair is on"},
		{meshFreeze, "node failure (SIGSTOP + node network dropped) of the node a pair is on"},
	} {
		var back []float64
		n, timeouts, via, window := 0, 0, "", 0.0
		for _, t := range trials {
			if t.Event != ev.event {
				continue
			}
			n++
			timeouts += t.Timeouts
			window = t.WindowSeconds
			if t.Seconds >= 0 {
				back, via = append(back, t.Seconds*1000), t.Via
			}
		}
		if n == 0 {
			continue
		}
		row := Row{Section: sec, Scenario: scMeshDERP + ": " + ev.title, Metric: "stop → pings answered again", Unit: "ms", Better: "lower"}
		if len(back) > 0 {
			row.Value = percentile(back, 50)
			row.Note = fmt.Sprintf("median of the %d of %d trials answered within %.0f s, max %.0f ms, via %s", len(back), n, window, percentile(back, 100), via)
		} else {
			row.Text = fmt.Sprintf("none within %.0f s", window)
			row.Note = fmt.Sprintf("%d trials", n)
		}
		row.Note += fmt.Sprintf("; %d pings unanswered in all (laptops that cannot go direct, no relay grant: DERP alone)", timeouts)
		r.add(row, "", 0, false)
	}
	var across []float64
	for _, t := range trials {
		if t.Across {
			across = append(across, t.AcrossSeconds*1000)
		}
	}
	if len(across) > 0 {
		r.add(Row{Section: sec, Scenario: scMeshDERP + ": node back, a fresh laptop on it", Metric: "first pong across the mesh", Unit: "ms",
			Value: percentile(across, 50), Better: "lower",
			Note: fmt.Sprintf("median of %d trials, max %.1f ms: the fresh laptop on the restarted node, its peer on the other node", len(across), percentile(across, 100))}, "", 0, false)
	}
}
