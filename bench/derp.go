package bench

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"tailscale.com/ipn/ipnstate"
	"tailscale.com/ipn/store"
	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/cmdline"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// DERP scenarios: the first pong between two laptops that cannot reach each
// other directly, via an off-site DERP region (the harness's, behind a
// delaying proxy) and via the relay's in-cluster region.
const (
	scOffsiteDERP   = "off-site DERP"
	scInClusterDERP = "in-cluster DERP (tsrelay)"
	scRelayDERPOn   = "tsrelay, DERP server on"
)

// wanDelay is the one-way delay of the emulated WAN link in front of the
// off-site DERP and STUN servers (tailnettest.ControlOptions.Delay): a
// laptop-to-laptop round trip via that region crosses it four times.
const wanDelay = 10 * time.Millisecond

// In-cluster DERP ports: the relay listens on them in its pod, and its node
// forwards them (as a load balancer would) beside the relay port.
const (
	derpPort = 8443
	stunPort = 3478
)

// firstPong is one round of a first-pong scenario.
type firstPong struct {
	Seconds float64 // from the first disco ping to the first pong
	RTTms   float64 // that pong's round-trip time
	Via     string
}

// derpResult is what the DERP section measured.
type derpResult struct {
	Offsite, InCluster []firstPong
	// The relay with its DERP server on: its idle RSS (KiB, before any
	// laptop joins), its /proc status figures then, and one load run
	// (Config.Pairs[0] pairs).
	RelayIdleKiB int64
	RelayIdle    map[string]int64
	Load         load
	LoadPairs    int
	LoadAttempts int // load runs made (see runInClusterDERP)
}

// stillRelayed checks, at once, that every pair's disco pong comes via the
// peer relay.
func stillRelayed(ctx context.Context, pairs []*pair) error {
	for _, p := range pairs {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := waitPath(wctx, p.a, p.ipB, pathRelay)
		cancel()
		if err != nil {
			return fmt.Errorf("after the transfer: %w", err)
		}
	}
	return nil
}

// runDERP runs the DERP section: rounds first pongs via the off-site
// region, then on a second tailnet rounds via the relay's in-cluster region
// (laptops homed there), with the relay's idle RSS and a load run.
func (b *bench) runDERP(ctx context.Context, dir string) (*derpResult, error) {
	res := &derpResult{}
	var err error
	if res.Offsite, err = b.runOffsiteDERP(ctx, filepath.Join(dir, "offsite")); err != nil {
		return res, fmt.Errorf("%s: %w", scOffsiteDERP, err)
	}
	if err := b.runInClusterDERP(ctx, filepath.Join(dir, "incluster"), res); err != nil {
		return res, fmt.Errorf("%s: %w", scInClusterDERP, err)
	}
	return res, nil
}

// runOffsiteDERP measures first pongs between fresh laptop pairs on a
// tailnet whose only DERP region is behind the emulated WAN.
func (b *bench) runOffsiteDERP(ctx context.Context, dir string) ([]firstPong, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	c, err := tailnettest.StartControlWith(worldGateway, nil, tailnettest.ControlOptions{Delay: wanDelay})
	if err != nil {
		return nil, err
	}
	tn := &tailnet{bench: b, dir: dir, control: c}
	tn.cl.add(c.Close)
	defer tn.close()
	return b.firstPongs(ctx, tn, "wan", "test", false, nil)
}

// runInClusterDERP starts tsrelay with its DERP region on, in a pod whose
// node forwards the relay, DERP and STUN ports, on a tailnet whose derpMap
// lists that region beside the off-site one (still behind the WAN delay, so
// the laptops home in-cluster). It records the relay's idle RSS, first
// pongs between fresh pairs homed in-cluster, and one load run.
func (b *bench) runInClusterDERP(ctx context.Context, dir string, res *derpResult) error {
	ctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	relayDir := filepath.Join(dir, "relay")
	cert, err := b.derpCert(relayDir)
	if err != nil {
		return err
	}
	tn := &tailnet{bench: b, dir: dir}
	defer tn.close()
	p, err := tn.inClusterDERP(ctx, cert)
	if err != nil {
		return err
	}

	// bigNode: the same GOMAXPROCS as the DERP-off relay it is compared
	// with (the scRelay variant).
	r, err := tn.startTSRelay(ctx, p, relayDir, true, bigNode,
		"TS_DERP_PORT="+strconv.Itoa(derpPort), "TS_STUN_PORT="+strconv.Itoa(stunPort))
	if err != nil {
		return err
	}
	tn.cleanup(func() { r.Close() })
	if err := waitReadyz(ctx, r); err != nil {
		return err
	}
	time.Sleep(b.settle()) // idle: ready, settled, as in runRelayed
	idle, err := procStatus(r.Pid())
	if err != nil {
		return err
	}
	res.RelayIdleKiB, res.RelayIdle = idle["VmRSS"], idle

	pairs := make([]*pair, 0, b.cfg.Rounds)
	res.InCluster, err = b.firstPongs(ctx, tn, "icd", derpregion.DefaultRegionCode, true, &pairs)
	if err != nil {
		return err
	}
	if len(b.cfg.Pairs) == 0 || len(pairs) == 0 {
		return nil
	}
	return tn.derpOnLoad(ctx, r.Pid(), pairs, res)
}

// derpCert makes the relay's DERP certificate where the relay keeps it
// (TS_STATE_DIR/tsrelay-derp.json under relayDir), so that the derpMap can
// pin it before the relay starts.
func (b *bench) derpCert(relayDir string) (*derpregion.Cert, error) {
	if err := os.MkdirAll(filepath.Join(relayDir, "state"), 0o700); err != nil {
		return nil, err
	}
	st, err := store.NewFileStore(b.cfg.Logf, filepath.Join(relayDir, "state", "tsrelay-derp.json"))
	if err != nil {
		return nil, fmt.Errorf("relay DERP certificate store: %w", err)
	}
	cert, err := derpregion.SelfSigned(st, time.Now())
	if err != nil {
		return nil, fmt.Errorf("relay DERP certificate: %w", err)
	}
	return cert, nil
}

// inClusterDERP makes the in-cluster DERP relay's pod, its node forwarding
// DERP and STUN too, and tn's control, whose derpMap lists that region
// (cert pinned) beside the off-site one. The pod's node address is only
// known once it exists, and the control must list the region from the
// start: so the pod comes first, then the control.
func (tn *tailnet) inClusterDERP(ctx context.Context, cert *derpregion.Cert) (pod, error) {
	p, err := tn.pod(ctx, "derp-relay", podMTU)
	if err != nil {
		return p, err
	}
	if err := forwardDERP(ctx, p); err != nil {
		return p, err
	}
	region, err := derpregion.Region(derpregion.RegionOptions{
		RegionID: derpregion.DefaultRegionID, RegionCode: derpregion.DefaultRegionCode, Cert: cert,
		Addrs:    []netip.Addr{p.LB.Addr()},
		DERPPort: derpPort, STUNPort: stunPort,
	})
	if err != nil {
		return p, err
	}
	c, err := tailnettest.StartControlWith(worldGateway, nil, tailnettest.ControlOptions{
		Delay: wanDelay, Regions: []*tailcfg.DERPRegion{region},
	})
	if err != nil {
		return p, err
	}
	tn.control = c
	tn.cleanup(c.Close)
	return p, nil
}

// forwardDERP has p's node forward the DERP (TCP) and STUN (UDP) ports to
// the pod as well as the relay port, as a load balancer with those ports
// does.
func forwardDERP(ctx context.Context, p pod) error {
	node := p.Netns + "-node"
	return cmdline.Run(ctx,
		fmt.Sprintf("ip netns exec %s iptables -t nat -A PREROUTING -i eth0 -p tcp --dport %d -j DNAT --to-destination %v:%d", node, derpPort, p.Addr, derpPort),
		fmt.Sprintf("ip netns exec %s iptables -t nat -A PREROUTING -i eth0 -p udp --dport %d -j DNAT --to-destination %v:%d", node, stunPort, p.Addr, stunPort),
	)
}

// derpOnLoad has the first Config.Pairs count of pairs (the first-pong
// pairs, and more if needed) send through the relay with its DERP server
// on, pid, at once, as the footprint rows do.
func (tn *tailnet) derpOnLoad(ctx context.Context, pid int, pairs []*pair, res *derpResult) error {
	b := tn.bench
	k := min(b.cfg.Pairs[0], len(pairs))
	if k < b.cfg.Pairs[0] {
		more, err := tn.pairs(ctx, b.cfg.Pairs[0]-k)
		if err != nil {
			return err
		}
		pairs = append(pairs, more...)
	}
	res.LoadPairs = b.cfg.Pairs[0]
	// Under load on 2 shared cores a pair sometimes loses the relay path
	// during the transfer and falls back to DERP, here the relay's own
	// DERP server, which would count DERP's CPU as relaying: a run whose
	// pairs are not all on the relay path afterwards is run again, once.
	for attempt := 1; ; attempt++ {
		var err error
		if res.Load, err = b.loadRelay(ctx, pid, pairs[:res.LoadPairs]); err != nil {
			return fmt.Errorf("%d pairs at once: %w", res.LoadPairs, err)
		}
		res.LoadAttempts = attempt
		err = stillRelayed(ctx, pairs[:res.LoadPairs])
		if err == nil {
			break
		}
		if attempt == 2 {
			return fmt.Errorf("%d pairs at once, twice: %w", res.LoadPairs, err)
		}
		b.cfg.Logf("%s: %d pairs at once: %v; running the load again", scRelayDERPOn, res.LoadPairs, err)
	}
	b.cfg.Logf("%s: %d pairs at once: %.0f Mbit/s in all, relay RSS peak %.1f MiB, %.2f CPU-s/GB",
		scRelayDERPOn, res.LoadPairs, res.Load.Mbps, float64(res.Load.PeakKiB)/1024, res.Load.CPUPerGB)
	return nil
}

// firstPongs starts Config.Rounds fresh laptop pairs on tn (named prefix0,
// prefix1, …), one at a time, and for each waits until both laptops are
// homed on region code (with home), then times a's disco pings to b from
// the first to the first pong, which must come via DERP region code. The
// pairs are appended to *keep, if given.
func (b *bench) firstPongs(ctx context.Context, tn *tailnet, prefix, code string, home bool, keep *[]*pair) ([]firstPong, error) {
	var out []firstPong
	for i := range b.cfg.Rounds {
		p, err := tn.pair(ctx, prefix+strconv.Itoa(i), false)
		if err != nil {
			return out, err
		}
		if keep != nil {
			*keep = append(*keep, p)
		}
		if home {
			if err := waitHome(ctx, p, code); err != nil {
				return out, err
			}
		}
		fp, err := firstPongOf(ctx, p)
		if err != nil {
			return out, err
		}
		b.cfg.Logf("%s round %d: first pong after %.3f s, RTT %.2f ms, via %s", prefix, i+1, fp.Seconds, fp.RTTms, fp.Via)
		if want := "DERP(" + code + ")"; fp.Via != want {
			return out, fmt.Errorf("first pong came via %s, want %s", fp.Via, want)
		}
		out = append(out, fp)
	}
	return out, nil
}

// waitHome waits until p.a's home DERP region, and b's as p.a sees it, are
// code.
func waitHome(ctx context.Context, p *pair, code string) error {
	wctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	defer cancel()
	var homeA, homeB string
	err := tailnettest.WaitFor(wctx, 50*time.Millisecond, func() (bool, error) {
		s, err := p.a.LocalClient().Status(wctx)
		if err != nil {
			return false, err
		}
		homeA = s.Self.Relay
		for _, ps := range s.Peer {
			for _, ip := range ps.TailscaleIPs {
				if ip == p.ipB {
					homeB = ps.Relay
				}
			}
		}
		return homeA == code && homeB == code, nil
	})
	if err != nil {
		return fmt.Errorf("home regions: a %q, b %q; want both %s: %w", homeA, homeB, code, err)
	}
	return nil
}

// firstPongOf sends disco pings from p.a to p.b until one is answered and
// returns how long that took from the first and the pong's RTT.
func firstPongOf(ctx context.Context, p *pair) (firstPong, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	t0 := time.Now()
	r, last, err := pingUntil(ctx, p.a, p.ipB, 10*time.Millisecond, func(*ipnstate.PingResult) bool { return true })
	if err != nil {
		return firstPong{}, fmt.Errorf("no pong from %v (last: %s): %w", p.ipB, last, err)
	}
	return firstPong{Seconds: time.Since(t0).Seconds(), RTTms: r.LatencySeconds * 1000, Via: describe(r)}, nil
}

// medianPong is the per-field median of rounds.
func medianPong(rounds []firstPong) (secs, rtt float64) {
	var s, r []float64
	for _, fp := range rounds {
		s, r = append(s, fp.Seconds), append(r, fp.RTTms)
	}
	return percentile(s, 50), percentile(r, 50)
}

// addDERP adds the DERP section's rows: first pongs via the in-cluster
// region against the off-site one, its first-pong RTT against the relayed
// RTT p50 (relay, the tsrelay peer relay row), and the relay with its DERP
// server on against it off (relay's idle RSS and load at the same pairs).
func (r *Report) addDERP(d *derpResult, relay *pathResult) {
	if d == nil {
		return
	}
	const sec = "derp"
	var offS, offRTT float64
	if n := len(d.Offsite); n > 0 {
		offS, offRTT = medianPong(d.Offsite)
		note := fmt.Sprintf("median of %d fresh pairs, via %s; emulated WAN %v each way in front of its DERP and STUN", n, d.Offsite[0].Via, wanDelay)
		r.add(Row{Section: sec, Scenario: scOffsiteDERP, Metric: "time to first pong", Unit: "ms", Value: offS * 1000, Better: "lower", Note: note}, "", 0, false)
		r.add(Row{Section: sec, Scenario: scOffsiteDERP, Metric: "first-pong RTT", Unit: "ms", Value: offRTT, Better: "lower", Note: note}, "", 0, false)
	}
	if n := len(d.InCluster); n > 0 {
		s, rtt := medianPong(d.InCluster)
		note := fmt.Sprintf("median of %d fresh pairs homed in-cluster, via %s", n, d.InCluster[0].Via)
		r.add(Row{Section: sec, Scenario: scInClusterDERP, Metric: "time to first pong", Unit: "ms", Value: s * 1000, Better: "lower", Note: note}, scOffsiteDERP, offS*1000, offS > 0)
		r.add(Row{Section: sec, Scenario: scInClusterDERP, Metric: "first-pong RTT", Unit: "ms", Value: rtt, Better: "lower", Note: note}, scOffsiteDERP, offRTT, offRTT > 0)
		var p50 float64
		if relay != nil {
			p50 = relay.P50
		}
		r.add(Row{Section: sec, Scenario: scInClusterDERP, Metric: "first-pong RTT / relayed RTT p50", Unit: "ms", Value: rtt, Better: "lower", Note: "goal: ratio ≤ 2"}, scRelay+" RTT p50", p50, p50 > 0)
	}
	if d.RelayIdleKiB > 0 {
		var off int64
		if relay != nil {
			off = relay.RelayIdleKiB
		}
		r.add(Row{Section: sec, Scenario: scRelayDERPOn, Metric: "RSS idle", Unit: "MiB", Value: float64(d.RelayIdleKiB) / 1024, Better: "lower",
			Note: rssParts(d.RelayIdle) + "; goal: ≤ 1.10× DERP off"}, scRelay+" (DERP off)", float64(off)/1024, off > 0)
	}
	if d.LoadPairs > 0 {
		var off load
		var ok bool
		if relay != nil {
			off, ok = relay.Load[d.LoadPairs]
		}
		base := fmt.Sprintf("%s (DERP off), %d pairs", scRelay, d.LoadPairs)
		note := loadNote(d.Load)
		if d.LoadAttempts > 1 {
			note += fmt.Sprintf("; the second of %d load runs (in the first a pair fell back to DERP)", d.LoadAttempts)
		}
		scen := fmt.Sprintf("%s, %d pairs", scRelayDERPOn, d.LoadPairs)
		r.add(Row{Section: sec, Scenario: scen, Metric: "RSS peak", Unit: "MiB", Value: float64(d.Load.PeakKiB) / 1024, Better: "lower", Note: note},
			base, float64(off.PeakKiB)/1024, ok && off.PeakKiB > 0)
		r.add(Row{Section: sec, Scenario: scen, Metric: "CPU per Gbit relayed", Unit: "CPU-ms", Value: d.Load.CPUPerGB / 8 * 1000, Better: "lower", Note: note},
			base, off.CPUPerGB/8*1000, ok && off.CPUPerGB > 0)
	}
}
