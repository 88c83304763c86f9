package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/ipn/store"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/cmdline"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// The DERP-port abuse section (issue 27): strangers attacking the in-cluster
// DERP region's public TCP port, one kind of attack per row, and a junk
// flood at the relay's UDP port and STUN while a pair relays.

// DERP attacks: what each abusive connection does before it waits for the
// server to close it.
const (
	atkNoTLS     = "TCP, never starts TLS"
	atkHeader    = "TLS, unfinished 3 KiB header"
	atkBigHeader = "TLS, 1 MiB header"
	atkKeepAlive = "TLS, one GET /generate_204, then idle keep-alive"
	atkNoInfo    = "upgraded to DERP, never sends ClientInfo"
)

// derpAttacks are the attacks, in report order.
var derpAttacks = []string{atkNoTLS, atkHeader, atkBigHeader, atkKeepAlive, atkNoInfo}

// attackSources is how many source addresses the attackers spread over, so
// that the per-source cap (derpregion: 16 unadmitted connections per
// address) does not stop them and the relay's global limits are what is
// measured: the worst case, many hosts at once. From one address, at most
// 16 connections are ever held.
const attackSources = 250

// attackHold is the longest an attacker keeps a connection the server has
// not closed; the row says how many were still open then.
const attackHold = 30 * time.Second

// podMemoryLimit is manifests/deployment.yaml's memory limit, what the
// peak is compared with.
const podMemoryLimit = 192 << 10 // KiB

// derpAbuseResult is one attack row's measurement; with Members, the
// admitted-clients row instead.
type derpAbuseResult struct {
	// Members is how many admitted member clients were connected (the
	// admitted-clients row); their cost is PeakKiB - IdleKiB.
	Members int
	Attack  string
	Conns   int
	// IdleKiB and PeakKiB: the relay's RSS before and during the attack.
	IdleKiB, PeakKiB int64
	// HeldPeak is the most connections the relay held unadmitted at once
	// (tsrelay_derp_unadmitted_connections, sampled).
	HeldPeak int
	// Refused counts tsrelay_derp_connections_refused_total by reason over
	// the attack.
	Refused map[string]float64
	// LongestHold is the longest any attacker connection stayed open
	// (seconds); StillOpen how many were open at attackHold.
	LongestHold float64
	StillOpen   int
	// Healthz is the slowest /healthz answer during the attack (seconds;
	// -1: one did not answer within 10 s).
	Healthz float64
	// Legit is how long after the attack's connections were opened a
	// tailnet member's DERP client was admitted (seconds; -1: not within
	// attackHold).
	Legit float64
}

// udpFloodResult is the junk-flood measurement.
type udpFloodResult struct {
	Mbps, FloodedMbps float64
	// PacedMbps is the transfer under a flood of pacedFloodPPS per port:
	// the relay's share of the cost, with the sender taking little of
	// the same 2 cores.
	PacedMbps, PacedPPS float64
	// Runs lists every transfer, by flood.
	Runs string
	// PPS is the junk packets a second sent to the relay port and STUN
	// during the full-speed flooded transfers (median).
	PPS float64
	// CPUPerPacket is the relay's CPU time per junk packet, in µs, over a
	// full-speed flood of both ports with no transfer; CPUPerPacketRelay
	// and CPUPerPacketSTUN the same over a paced flood of one port alone.
	CPUPerPacket, CPUPerPacketRelay, CPUPerPacketSTUN float64
	// PacedRatio and FullRatio are the median of each round's flooded
	// transfer over the same round's unflooded one (paired, so that the
	// machine's drift between rounds cancels).
	PacedRatio, FullRatio float64
	// ControlMbps is the transfer under the paced flood sent to closed
	// ports of the pod instead (the same packets, the same path into the
	// pod, no socket): what the senders and the kernel cost the pair on
	// these shared cores. ControlRatio is its paired ratio to the
	// unflooded transfer, and PacedOverControl the paced flood's to it:
	// the relay's own share.
	ControlMbps, ControlRatio, PacedOverControl float64
	// STUNAmp is bytes STUN answered / bytes sent to it, for well-formed
	// binding requests, the most of the paced floods; STUNAmpAll the same
	// over everything the full-speed flood with no transfer sent to STUN. RelayBytesBack is what the relay port sent back to the
	// flooder at all.
	STUNAmp, STUNAmpAll float64
	RelayBytesBack      int64
	// OffRelay counts, by flood (packets/s per port; 0: full speed, -1:
	// none, controlFlood: the control), the transfers at whose end the
	// pair was no longer on the relay: each started on it.
	OffRelay map[int]int
	Rounds   int // transfers per flood
}

// derpAbuseSetup is the section's tailnet: one pod whose node forwards
// the relay, DERP and STUN ports, a control listing the relay's region,
// and a member node key the relay admits.
type derpAbuseSetup struct {
	tn     *tailnet
	p      pod
	region *tailcfg.DERPRegion
	member key.NodePrivate
	dir    string
	srcs   []netip.Addr
	// registered: control knows member (once a relay has joined:
	// testcontrol has no node table before its first node).
	registered bool
}

// registerMember adds the legitimate client to the tailnet: a node
// known to control, so that the relay's WhoIsNodeKey finds it, played by
// this process.
func (s *derpAbuseSetup) registerMember() {
	if s.registered {
		return
	}
	s.registered = true
	r := s.member.Public().Raw32()
	ip := netip.AddrFrom4([4]byte{100, 64, r[0], r[1]})
	s.tn.control.Server.UpdateNode(&tailcfg.Node{
		ID: tailcfg.NodeID(binary.LittleEndian.Uint32(r[:]) | 1), StableID: "abuse-member",
		User: 1, Machine: key.NewMachine().Public(), Key: s.member.Public(), DiscoKey: key.NewDisco().Public(), MachineAuthorized: true,
		Addresses: []netip.Prefix{netip.PrefixFrom(ip, 32)}, AllowedIPs: []netip.Prefix{netip.PrefixFrom(ip, 32)},
	})
}

// runDERPAbuse runs the section: every attack at each connection count,
// each on a fresh relay, then the UDP flood.
func (b *bench) runDERPAbuse(ctx context.Context, dir string) ([]derpAbuseResult, *udpFloodResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()
	s, err := b.derpAbuseSetup(ctx, dir)
	if err != nil {
		return nil, nil, err
	}
	defer s.tn.close()
	var out []derpAbuseResult
	for _, n := range b.abuseConns() {
		for _, atk := range derpAttacks {
			if ctx.Err() != nil {
				return out, nil, ctx.Err()
			}
			name := fmt.Sprintf("%d × %s", n, atk)
			b.cfg.Logf("DERP abuse: %s", name)
			r, err := s.startRelay(ctx, b, fmt.Sprintf("relay-%d-%d", n, len(out)))
			if err != nil {
				return out, nil, fmt.Errorf("%s: %w", name, err)
			}
			res, err := s.attack(ctx, r, atk, n)
			r.Close()
			if err != nil {
				return out, nil, fmt.Errorf("%s: %w", name, err)
			}
			b.cfg.Logf("DERP abuse: %s: +%.1f MiB (peak %.1f MiB), held ≤ %d, refused %v, longest %.1f s, /healthz ≤ %.3f s, member admitted after %.2f s",
				name, float64(res.PeakKiB-res.IdleKiB)/1024, float64(res.PeakKiB)/1024, res.HeldPeak, res.Refused, res.LongestHold, res.Healthz, res.Legit)
			out = append(out, res)
		}
	}
	b.cfg.Logf("DERP: what admitted clients cost")
	mc, err := s.memberCost(ctx, b)
	if err != nil {
		return out, nil, fmt.Errorf("admitted clients: %w", err)
	}
	out = append(out, mc)
	b.cfg.Logf("UDP junk flood")
	fl, err := s.flood(ctx, b)
	if err != nil {
		return out, fl, fmt.Errorf("UDP flood: %w", err)
	}
	return out, fl, nil
}

// abuseConns are the connection counts of the attack rows.
func (b *bench) abuseConns() []int {
	if b.cfg.Smoke {
		return []int{100}
	}
	return []int{100, 1000}
}

func (b *bench) derpAbuseSetup(ctx context.Context, dir string) (_ *derpAbuseSetup, err error) {
	s := &derpAbuseSetup{dir: dir, member: key.NewNode()}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	// One certificate for every relay of the section: each starts from a
	// state directory holding it (TS_STATE_DIR/tsrelay-derp.json).
	st, err := store.NewFileStore(b.cfg.Logf, filepath.Join(dir, "tsrelay-derp.json"))
	if err != nil {
		return nil, err
	}
	cert, err := derpregion.SelfSigned(st, time.Now())
	if err != nil {
		return nil, err
	}
	s.tn = &tailnet{bench: b, dir: dir}
	defer func() {
		if err != nil {
			s.tn.close()
		}
	}()
	if s.p, err = s.tn.pod(ctx, "abuse-relay", podMTU); err != nil {
		return nil, err
	}
	node := s.p.Netns + "-node"
	if err := cmdline.Run(ctx,
		fmt.Sprintf("ip netns exec %s iptables -t nat -A PREROUTING -i eth0 -p tcp --dport %d -j DNAT --to-destination %v:%d", node, derpPort, s.p.Addr, derpPort),
		fmt.Sprintf("ip netns exec %s iptables -t nat -A PREROUTING -i eth0 -p udp --dport %d -j DNAT --to-destination %v:%d", node, stunPort, s.p.Addr, stunPort),
		// The control flood's ports: forwarded like the relay's, served
		// by nothing in the pod.
		fmt.Sprintf("ip netns exec %s iptables -t nat -A PREROUTING -i eth0 -p udp --dport %d:%d -j DNAT --to-destination %v", node, closedRelayPort, closedSTUNPort, s.p.Addr),
	); err != nil {
		return nil, err
	}
	if s.region, err = derpregion.Region(derpregion.RegionOptions{
		RegionID: derpregion.DefaultRegionID, RegionCode: derpregion.DefaultRegionCode, Cert: cert,
		Addrs:    []netip.Addr{s.p.LB.Addr()},
		DERPPort: derpPort, STUNPort: stunPort,
	}); err != nil {
		return nil, err
	}
	c, err := tailnettest.StartControlWith(worldGateway, nil, tailnettest.ControlOptions{Regions: []*tailcfg.DERPRegion{s.region}})
	if err != nil {
		return nil, err
	}
	s.tn.control = c
	s.tn.cleanup(c.Close)
	// The attackers' source addresses, on the world bridge.
	var batch strings.Builder
	for i := range attackSources {
		a := netip.AddrFrom4([4]byte{10, 88, 200 + byte(i/250), byte(i%250 + 1)})
		s.srcs = append(s.srcs, a)
		fmt.Fprintf(&batch, "addr add %v/%d dev %s\n", a, worldPrefix, worldBridge)
	}
	if err := runStdin(ctx, batch.String(), "ip", "-batch", "-"); err != nil {
		return nil, fmt.Errorf("attacker addresses: %w", err)
	}
	return s, nil
}

// runStdin runs a program with input on its standard input.
func runStdin(ctx context.Context, input string, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// startRelay starts a fresh relay with the DERP region on (the section's
// certificate), waits until it is ready and admits the member, and lets it
// settle.
func (s *derpAbuseSetup) startRelay(ctx context.Context, b *bench, name string) (*tailnettest.Relay, error) {
	dir := filepath.Join(s.dir, name)
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return nil, err
	}
	certState, err := os.ReadFile(filepath.Join(s.dir, "tsrelay-derp.json"))
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "state", "tsrelay-derp.json"), certState, 0o600); err != nil {
		return nil, err
	}
	env := append([]string{"TS_DERP_PORT=" + strconv.Itoa(derpPort), "TS_STUN_PORT=" + strconv.Itoa(stunPort)}, b.cfg.AbuseEnv...)
	r, err := s.tn.startTSRelay(ctx, s.p, dir, true, env...)
	if err != nil {
		return nil, err
	}
	if err := waitReadyz(ctx, r); err != nil {
		r.Close()
		return nil, err
	}
	// The member is admitted once the relay's netmap has it.
	s.registerMember()
	if _, err := s.admitMember(ctx, time.Minute); err != nil {
		r.Close()
		return nil, fmt.Errorf("member before the attack: %w", err)
	}
	time.Sleep(b.settle())
	return r, nil
}

// admitMember connects the member's DERP client, retrying every 100 ms
// until the relay admits it (sends its server info) or within passes, and
// returns how long that took.
func (s *derpAbuseSetup) admitMember(ctx context.Context, within time.Duration) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	var last error
	for ctx.Err() == nil {
		if last = s.connectMember(ctx); last == nil {
			return time.Since(start), nil
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	return 0, fmt.Errorf("not admitted within %v: %w", within, last)
}

// connectMember makes one admission attempt.
func (s *derpAbuseSetup) connectMember(ctx context.Context) error {
	c := derphttp.NewRegionClient(s.member, logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return s.region })
	defer c.Close()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.Connect(cctx); err != nil {
		return err
	}
	rc := make(chan error, 1)
	go func() {
		m, err := c.Recv()
		if err == nil {
			if _, ok := m.(derp.ServerInfoMessage); !ok {
				err = fmt.Errorf("first message %T, want the server info", m)
			}
		}
		rc <- err
	}()
	select {
	case err := <-rc:
		return err
	case <-cctx.Done():
		return cctx.Err()
	}
}

// derpMetrics reads the relay's unadmitted gauge and refusals by reason.
func derpMetrics(ctx context.Context, r *tailnettest.Relay) (unadmitted float64, refused map[string]float64, err error) {
	mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	m, err := r.Metrics(mctx)
	if err != nil {
		return 0, nil, err
	}
	unadmitted, _ = tailnettest.MetricSum(m, "tsrelay_derp_unadmitted_connections")
	refused = map[string]float64{}
	if mf, ok := m["tsrelay_derp_connections_refused_total"]; ok {
		for _, mm := range mf.Metric {
			for _, lp := range mm.Label {
				if lp.GetName() == "reason" {
					refused[lp.GetValue()] = mm.GetCounter().GetValue()
				}
			}
		}
	}
	return unadmitted, refused, nil
}

// attack opens n connections of kind atk at once from the attacker
// addresses, holds each until the relay closes it (or attackHold), and
// measures the relay meanwhile.
func (s *derpAbuseSetup) attack(ctx context.Context, r *tailnettest.Relay, atk string, n int) (derpAbuseResult, error) {
	res := derpAbuseResult{Attack: atk, Conns: n, Healthz: 0, Legit: -1}
	_, before, err := derpMetrics(ctx, r)
	if err != nil {
		return res, err
	}
	if res.IdleKiB, err = rssKiB(r.Pid()); err != nil {
		return res, err
	}
	rss := sampleRSS(r.Pid())

	// Held connections, sampled from the relay's gauge.
	sampleCtx, stopSampling := context.WithCancel(ctx)
	var held atomic.Int64
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for sampleCtx.Err() == nil {
			if u, _, err := derpMetrics(sampleCtx, r); err == nil && int64(u) > held.Load() {
				held.Store(int64(u))
			}
			select {
			case <-sampleCtx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()

	target := netip.AddrPortFrom(s.p.LB.Addr(), derpPort)
	var (
		wg      sync.WaitGroup
		opened  sync.WaitGroup
		mu      sync.Mutex
		longest time.Duration
		open    int
	)
	start := time.Now()
	for i := range n {
		wg.Add(1)
		opened.Add(1)
		go func() {
			defer wg.Done()
			d, stillOpen := attackOne(ctx, s.srcs[i%len(s.srcs)], target, atk, opened.Done)
			mu.Lock()
			longest = max(longest, d)
			if stillOpen {
				open++
			}
			mu.Unlock()
		}()
	}
	opened.Wait()

	// While the attack lasts: a member connects, and /healthz is asked
	// every 500 ms.
	legit := make(chan float64, 1)
	go func() {
		if _, err := s.admitMember(ctx, attackHold); err == nil {
			legit <- time.Since(start).Seconds()
		} else {
			legit <- -1
		}
	}()
	attackDone := make(chan struct{})
	go func() { wg.Wait(); close(attackDone) }()
	for done := false; !done; {
		t0 := time.Now()
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		code, _, err := r.Get(hctx, "/healthz")
		cancel()
		if err != nil || code != http.StatusOK {
			res.Healthz = -1
		} else if res.Healthz >= 0 {
			res.Healthz = max(res.Healthz, time.Since(t0).Seconds())
		}
		select {
		case <-attackDone:
			done = true
		case <-time.After(500 * time.Millisecond):
		}
	}
	res.Legit = <-legit
	stopSampling()
	<-sampled
	res.PeakKiB = rss.Stop()
	res.HeldPeak = int(held.Load())
	res.LongestHold, res.StillOpen = longest.Seconds(), open
	_, after, err := derpMetrics(ctx, r)
	if err != nil {
		return res, err
	}
	res.Refused = map[string]float64{}
	for k, v := range after {
		if d := v - before[k]; d > 0 {
			res.Refused[k] = d
		}
	}
	return res, nil
}

// attackOne makes one abusive connection from src and holds it until the
// server closes it or attackHold passes; opened is called once the
// connection did its part (or failed to). It returns how long the
// connection stayed open and whether it was still open at attackHold.
func attackOne(ctx context.Context, src netip.Addr, target netip.AddrPort, atk string, opened func()) (time.Duration, bool) {
	var once sync.Once
	done := func() { once.Do(opened) }
	defer done()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 10 * time.Second}
	c, err := d.DialContext(ctx, "tcp", target.String())
	if err != nil {
		return 0, false
	}
	defer c.Close()
	start := time.Now()
	c.SetDeadline(start.Add(attackHold))
	var conn net.Conn = c
	if atk != atkNoTLS {
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
		if err := tc.HandshakeContext(ctx); err != nil {
			return time.Since(start), false
		}
		conn = tc
	}
	br := bufio.NewReader(conn)
	switch atk {
	case atkHeader:
		fmt.Fprintf(conn, "GET /derp HTTP/1.1\r\nHost: derp\r\nX-Pad: %s", strings.Repeat("a", 3<<10))
	case atkBigHeader:
		go fmt.Fprintf(conn, "GET /derp HTTP/1.1\r\nHost: derp\r\nX-Pad: %s", strings.Repeat("a", 1<<20))
	case atkKeepAlive:
		io.WriteString(conn, "GET /generate_204 HTTP/1.1\r\nHost: derp\r\n\r\n")
		if resp, err := http.ReadResponse(br, nil); err == nil {
			resp.Body.Close()
		}
	case atkNoInfo:
		io.WriteString(conn, "GET /derp HTTP/1.1\r\nHost: derp\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
		if resp, err := http.ReadResponse(br, nil); err == nil && resp.StatusCode == http.StatusSwitchingProtocols {
			derp.ReadFrameHeader(br) // the server key; then silence
		}
	}
	done()
	_, err = io.Copy(io.Discard, br)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return time.Since(start), true
	}
	return time.Since(start), false
}

// flood measures a pair's relayed throughput through a fresh relay
// (its DERP region on) without and with a junk flood at the relay's UDP
// port and its STUN port; the relay's CPU per junk packet over a flood
// with no transfer; and STUN's amplification.
func (s *derpAbuseSetup) flood(ctx context.Context, b *bench) (*udpFloodResult, error) {
	res := &udpFloodResult{}
	r, err := s.startRelay(ctx, b, "relay-flood")
	if err != nil {
		return res, err
	}
	defer r.Close()
	ps, err := s.tn.pairs(ctx, 1)
	if err != nil {
		return res, err
	}
	p := ps[0]
	wctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	_, err = waitPath(wctx, p.a, p.ipB, pathRelay)
	cancel()
	if err != nil {
		return res, err
	}
	d := b.loadTransfer()
	if _, err := throughput(ctx, p.nsA, p.ipB, time.Second); err != nil {
		return res, fmt.Errorf("warm-up: %w", err)
	}
	relayAddr := s.p.LB
	stunAddr := netip.AddrPortFrom(s.p.LB.Addr(), stunPort)

	// Floods with no transfer: the relay's CPU per junk packet, at full
	// speed at both ports, then paced at each port alone (the relay port
	// is Tailscale's udprelay.Server, STUN is ours).
	fs, cpu, err := cpuPerJunkPacket(ctx, r.Pid(), relayAddr, stunAddr, 0)
	if err != nil {
		return res, err
	}
	res.CPUPerPacket = cpu
	res.STUNAmpAll, res.RelayBytesBack = fs.stunAmpAll(), fs.relayBack.Load()
	if _, res.CPUPerPacketRelay, err = cpuPerJunkPacket(ctx, r.Pid(), relayAddr, netip.AddrPort{}, pacedFloodPPS); err != nil {
		return res, err
	}
	if _, res.CPUPerPacketSTUN, err = cpuPerJunkPacket(ctx, r.Pid(), netip.AddrPort{}, stunAddr, pacedFloodPPS); err != nil {
		return res, err
	}

	// Transfers without a flood, under a full-speed one and under a paced
	// one, interleaved over Config.Rounds rounds (this machine's other
	// work drifts; interleaving spreads it over all three): medians.
	//
	// Every transfer starts with the pair on the relay: a flood can push
	// it onto DERP (its disco pings are lost with the junk in the socket's
	// full receive buffer), and magicsock takes up to its 30 s discovery
	// interval to come back, so without the wait a transfer after a flood
	// could measure DERP instead of the relay.
	var plain, full, paced, control, fullPPS, pacedPPS []float64
	res.OffRelay, res.Rounds = map[int]int{}, b.cfg.Rounds
	closedRelay, closedSTUN := netip.AddrPortFrom(relayAddr.Addr(), closedRelayPort), netip.AddrPortFrom(relayAddr.Addr(), closedSTUNPort)
	for range b.cfg.Rounds {
		for _, pps := range []int{-1, 0, pacedFloodPPS, controlFlood} {
			wctx, cancel := context.WithTimeout(ctx, 90*time.Second)
			_, err := waitPath(wctx, p.a, p.ipB, pathRelay)
			cancel()
			if err != nil {
				return res, fmt.Errorf("the pair did not come back to the relay within 90 s after a flood: %w", err)
			}
			var fs *floodState
			switch {
			case pps == controlFlood:
				fs, err = startFlood(ctx, closedRelay, closedSTUN, pacedFloodPPS)
			case pps >= 0:
				fs, err = startFlood(ctx, relayAddr, stunAddr, pps)
			}
			if err != nil {
				return res, err
			}
			t0 := time.Now()
			mbps, err := throughput(ctx, p.nsA, p.ipB, d)
			secs := time.Since(t0).Seconds()
			if err == nil && stillRelayed(ctx, []*pair{p}) != nil {
				res.OffRelay[pps]++ // pushed off the relay during the transfer
			}
			if fs != nil {
				fs.stop()
			}
			if err != nil {
				return res, fmt.Errorf("transfer (flood %d packets/s per port; 0: unpaced, -1: none): %w", pps, err)
			}
			switch pps {
			case -1:
				plain = append(plain, mbps)
			case 0:
				full, fullPPS = append(full, mbps), append(fullPPS, float64(fs.sent)/secs)
			case controlFlood:
				control = append(control, mbps)
			default:
				paced, pacedPPS = append(paced, mbps), append(pacedPPS, float64(fs.sent)/secs)
				// Amplification from a paced flood: a full-speed one
				// loses packets on the way, which would flatter it.
				res.STUNAmp = max(res.STUNAmp, fs.stunAmp())
				res.RelayBytesBack += fs.relayBack.Load()
			}
		}
	}
	res.Mbps, res.FloodedMbps, res.PacedMbps = percentile(plain, 50), percentile(full, 50), percentile(paced, 50)
	res.FullRatio, res.PacedRatio = medianRatio(full, plain), medianRatio(paced, plain)
	res.ControlMbps, res.ControlRatio, res.PacedOverControl = percentile(control, 50), medianRatio(control, plain), medianRatio(paced, control)
	res.PPS, res.PacedPPS = percentile(fullPPS, 50), percentile(pacedPPS, 50)
	res.Runs = fmt.Sprintf("none %s, full speed %s, paced %s, paced at closed ports %s", fmtRuns(plain), fmtRuns(full), fmtRuns(paced), fmtRuns(control))
	b.cfg.Logf("UDP flood: %.0f Mbit/s unflooded, %.0f flooded (%.0f junk packets/s, %.2f× paired), %.0f under %.0f packets/s (%.2f× paired), %.0f under the same at closed ports (%.2f× paired; paced %.2f× of it); %.2f µs relay CPU per junk packet (paced: %.2f relay port, %.2f STUN); STUN amplification %.2f (requests), %.2f (all); relay port sent back %d bytes",
		res.Mbps, res.FloodedMbps, res.PPS, res.FullRatio, res.PacedMbps, res.PacedPPS, res.PacedRatio, res.ControlMbps, res.ControlRatio, res.PacedOverControl,
		res.CPUPerPacket, res.CPUPerPacketRelay, res.CPUPerPacketSTUN, res.STUNAmp, res.STUNAmpAll, res.RelayBytesBack)
	return res, nil
}

// medianRatio is the median of xs[i]/base[i].
func medianRatio(xs, base []float64) float64 {
	var r []float64
	for i := range min(len(xs), len(base)) {
		if base[i] > 0 {
			r = append(r, xs[i]/base[i])
		}
	}
	return percentile(r, 50)
}

// cpuPerJunkPacket floods relay and stunAddr (a zero address: not that
// one) with junk for 3 s at pps per port (0: full speed) and returns the
// stopped flood and the relay process's CPU time per packet sent, in µs,
// beyond what it spent over as long a quiet spell just before.
func cpuPerJunkPacket(ctx context.Context, pid int, relay, stunAddr netip.AddrPort, pps int) (*floodState, float64, error) {
	// What the relay spends anyway (its loops, the pair's disco pings)
	// over as long a quiet spell, taken off the flood's figure.
	idle0, err := cpuSeconds(pid)
	if err != nil {
		return nil, 0, err
	}
	t0 := time.Now()
	time.Sleep(3 * time.Second)
	idle1, err := cpuSeconds(pid)
	if err != nil {
		return nil, 0, err
	}
	idleRate := (idle1 - idle0) / time.Since(t0).Seconds()
	cpu0, err := cpuSeconds(pid)
	if err != nil {
		return nil, 0, err
	}
	fs, err := startFlood(ctx, relay, stunAddr, pps)
	if err != nil {
		return nil, 0, err
	}
	t1 := time.Now()
	time.Sleep(3 * time.Second) // the flood's length
	fs.stop()
	cpu1, err := cpuSeconds(pid)
	if err != nil || fs.sent == 0 {
		return fs, 0, err
	}
	extra := max(0, cpu1-cpu0-idleRate*time.Since(t1).Seconds())
	return fs, extra / float64(fs.sent) * 1e6, nil
}

// pacedFloodPPS is the per-port rate of the paced flood.
const pacedFloodPPS = 10_000

// controlFlood names the control flood in udpFloodResult.OffRelay: the
// paced flood, sent to closedRelayPort and closedSTUNPort.
const controlFlood = -2

// closedRelayPort and closedSTUNPort are two UDP ports the node forwards
// to the pod, where nothing listens: the control flood's targets in place
// of the relay port and STUN.
const (
	closedRelayPort = 9
	closedSTUNPort  = closedRelayPort + 1
)

// floodState is a running junk flood.
type floodState struct {
	cancel              context.CancelFunc
	wg                  sync.WaitGroup
	sent                int64
	sentN               atomic.Int64
	stunReqBytes        atomic.Int64 // well-formed binding requests sent to STUN
	stunAllBytes        atomic.Int64 // everything sent to STUN
	stunBack, relayBack atomic.Int64
	stunConn, relayConn *net.UDPConn
}

// startFlood sends junk to the relay port and to STUN from one socket
// each, pps packets a second per socket or (0) as fast as one goroutine
// per socket can, and counts what comes back. A zero address is not
// flooded.
func startFlood(ctx context.Context, relay, stunAddr netip.AddrPort, pps int) (*floodState, error) {
	fs := &floodState{}
	for _, to := range []struct {
		addr netip.AddrPort
		c    **net.UDPConn
	}{{relay, &fs.relayConn}, {stunAddr, &fs.stunConn}} {
		if !to.addr.IsValid() {
			continue
		}
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(to.addr))
		if err != nil {
			fs.closeConns()
			return nil, err
		}
		*to.c = c
	}
	ctx, fs.cancel = context.WithCancel(ctx)
	for _, c := range []*net.UDPConn{fs.relayConn, fs.stunConn} {
		if c == nil {
			continue
		}
		isSTUN := c == fs.stunConn
		fs.wg.Go(func() { // receiver: count what comes back
			buf := make([]byte, 64<<10)
			for {
				n, err := c.Read(buf)
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					continue // ECONNREFUSED from an ICMP error: keep reading
				}
				if isSTUN {
					fs.stunBack.Add(int64(n))
				} else {
					fs.relayBack.Add(int64(n))
				}
			}
		})
		fs.wg.Go(func() { // sender
			rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
			buf := make([]byte, 1500)
			start := time.Now()
			for i := 0; ctx.Err() == nil; i++ {
				if pps > 0 && i >= int(time.Since(start).Seconds()*float64(pps)) {
					time.Sleep(time.Millisecond) // ahead of the pace
					i--
					continue
				}
				pkt := junk(rng, buf, i, isSTUN)
				if _, err := c.Write(pkt); err != nil {
					continue
				}
				fs.sentN.Add(1)
				if isSTUN {
					fs.stunAllBytes.Add(int64(len(pkt)))
					if i%4 == 0 {
						fs.stunReqBytes.Add(int64(len(pkt)))
					}
				}
			}
		})
	}
	return fs, nil
}

// junk returns the i-th flood packet: in turn a well-formed STUN binding
// request (to STUN only), random bytes of random length, a truncated or
// malformed Geneve header (Tailscale's peer relay framing), a STUN
// header with garbage attributes.
func junk(rng *rand.Rand, buf []byte, i int, toSTUN bool) []byte {
	switch i % 4 {
	case 0:
		if toSTUN {
			return stun.Request(stun.NewTxID())
		}
		fallthrough
	case 1:
		n := 1 + rng.IntN(1400)
		for j := range n {
			buf[j] = byte(rng.Uint32())
		}
		return buf[:n]
	case 2:
		// Geneve: version 0, flags, protocol 0x7A11 (disco) or 0x7A12
		// (WireGuard), a random VNI; cut short or followed by garbage.
		buf[0], buf[1] = 0, byte(rng.Uint32())
		binary.BigEndian.PutUint16(buf[2:], 0x7A11+uint16(rng.IntN(2)))
		binary.BigEndian.PutUint32(buf[4:], rng.Uint32()<<8)
		n := 1 + rng.IntN(7)
		if rng.IntN(2) == 0 {
			n = 8 + rng.IntN(200)
			for j := 8; j < n; j++ {
				buf[j] = byte(rng.Uint32())
			}
		}
		return buf[:n]
	default:
		// STUN: a binding request header whose attributes are garbage
		// (or whose length lies).
		copy(buf, stun.Request(stun.NewTxID())[:20])
		n := 20 + rng.IntN(100)
		for j := 20; j < n; j++ {
			buf[j] = byte(rng.Uint32())
		}
		return buf[:n]
	}
}

// stop ends the flood and waits for its goroutines.
func (fs *floodState) stop() {
	fs.cancel()
	// Let replies in flight arrive, then unblock the readers.
	time.Sleep(200 * time.Millisecond)
	fs.closeConns()
	fs.wg.Wait()
	fs.sent = fs.sentN.Load()
}

// closeConns closes the flood's sockets, which ends its readers.
func (fs *floodState) closeConns() {
	for _, c := range []*net.UDPConn{fs.relayConn, fs.stunConn} {
		if c != nil {
			c.Close()
		}
	}
}

// stunAmp is STUN's answer bytes per byte of well-formed request (every
// answer is to one of those: STUN answers nothing else).
func (fs *floodState) stunAmp() float64 {
	if fs.stunReqBytes.Load() == 0 {
		return 0
	}
	return float64(fs.stunBack.Load()) / float64(fs.stunReqBytes.Load())
}

// stunAmpAll is STUN's answer bytes per byte sent to it.
func (fs *floodState) stunAmpAll() float64 {
	if fs.stunAllBytes.Load() == 0 {
		return 0
	}
	return float64(fs.stunBack.Load()) / float64(fs.stunAllBytes.Load())
}

// addDERPAbuse adds a row per DERP attack (the relay's extra RSS, with
// the rest in the note) and the flood's rows: flooded throughput against
// the same run's unflooded figure, the relay's CPU per junk packet, and
// STUN's amplification.
func (r *Report) addDERPAbuse(res []derpAbuseResult, fl *udpFloodResult, env []string) {
	settings := "default limits"
	if len(env) > 0 {
		settings = strings.Join(env, " ")
	}
	for _, a := range res {
		extra := float64(a.PeakKiB-a.IdleKiB) / 1024
		if a.Members > 0 {
			per := float64(a.PeakKiB-a.IdleKiB) / float64(a.Members)
			r.add(Row{Section: "abuse", Scenario: "tsrelay DERP port", Metric: fmt.Sprintf("%d admitted member clients connected → extra RSS", a.Members),
				Unit: "MiB", Value: extra, Better: "lower",
				Note: fmt.Sprintf("%s; %.0f KiB per client; RSS %.1f → %.1f MiB (the members already in the relay's netmap at both)", settings, per, float64(a.IdleKiB)/1024, float64(a.PeakKiB)/1024)}, "", 0, false)
			continue
		}
		legit := "a member's DERP client was NOT admitted within 30 s"
		if a.Legit >= 0 {
			legit = fmt.Sprintf("a member's DERP client admitted %.2f s after the attack opened", a.Legit)
		}
		health := "/healthz did NOT answer within 10 s once"
		if a.Healthz >= 0 {
			health = fmt.Sprintf("/healthz ≤ %.0f ms", a.Healthz*1000)
		}
		goals := a.PeakKiB-a.IdleKiB <= 32<<10 && a.Healthz >= 0 && a.Healthz < 1 && a.Legit >= 0 && a.PeakKiB < podMemoryLimit
		note := fmt.Sprintf("%s; from %d addresses; peak %.1f MiB of the pod's 192 MiB limit; held ≤ %d unadmitted at once; refused %s; longest open %.1f s (%d still open at %.0f s); %s; %s; goals (≤ 32 MiB extra, /healthz < 1 s, member admitted, under the limit) %s",
			settings, min(a.Conns, attackSources), float64(a.PeakKiB)/1024, a.HeldPeak, fmtRefused(a.Refused), a.LongestHold, a.StillOpen, attackHold.Seconds(), health, legit, metOrNot(goals))
		r.add(Row{Section: "abuse", Scenario: "tsrelay DERP port", Metric: fmt.Sprintf("%d × %s → extra RSS", a.Conns, a.Attack),
			Unit: "MiB", Value: extra, Better: "lower", Note: note}, "", 0, false)
	}
	if fl == nil || fl.Mbps == 0 {
		return
	}
	sc := "tsrelay, junk flood at relay port + STUN"
	offRelay := func(pps int) string {
		return fmt.Sprintf("every transfer started on the relay; off it at the end in %d of %d", fl.OffRelay[pps], fl.Rounds)
	}
	r.add(Row{Section: "abuse", Scenario: "tsrelay, no flood", Metric: "TCP throughput a→b through the relay", Unit: "Mbit/s", Value: fl.Mbps, Better: "higher",
		Note: "median; the four scenarios' transfers interleaved: " + fl.Runs + "; " + offRelay(-1)}, "", 0, false)
	relayed := offRelay(0)
	r.add(Row{Section: "abuse", Scenario: sc, Metric: "TCP throughput a→b through the relay", Unit: "Mbit/s", Value: fl.FloodedMbps, Better: "higher",
		Note: fmt.Sprintf("%.0f junk packets/s, one sender per port as fast as it can, on the same 2 cores as the pair and the relay (random bytes, truncated and malformed Geneve, STUN with garbage attributes, well-formed STUN requests): the senders take about a core of their own; %s; each round's flooded transfer over the same round's unflooded one: median %.2f×; goal ≥ 0.8× (on that) %s", fl.PPS, relayed, fl.FullRatio, metOrNot(fl.FullRatio >= 0.8))},
		"tsrelay, no flood", fl.Mbps, true)
	if fl.PacedMbps > 0 {
		r.add(Row{Section: "abuse", Scenario: "tsrelay, paced junk flood at relay port + STUN", Metric: "TCP throughput a→b through the relay", Unit: "Mbit/s", Value: fl.PacedMbps, Better: "higher",
			Note: fmt.Sprintf("the same junk at %.0f packets/s in all (%d per port), so that the senders take little CPU; %s; each round's flooded transfer over the same round's unflooded one: median %.2f×; goal ≥ 0.8× (on that) %s; over the same round's control flood at closed ports (the relay's own share): median %.2f×", fl.PacedPPS, pacedFloodPPS, offRelay(pacedFloodPPS), fl.PacedRatio, metOrNot(fl.PacedRatio >= 0.8), fl.PacedOverControl)},
			"tsrelay, no flood", fl.Mbps, true)
	}
	if fl.ControlMbps > 0 {
		r.add(Row{Section: "abuse", Scenario: "control: paced junk flood at closed ports", Metric: "TCP throughput a→b through the relay", Unit: "Mbit/s", Value: fl.ControlMbps, Better: "higher",
			Note: fmt.Sprintf("the paced flood sent to two ports the node forwards to the pod where nothing listens: the same senders, packets and path, no socket; what the senders and the kernel take from the pair on the shared cores, which the relay cannot save; %s; paired median %.2f×", offRelay(controlFlood), fl.ControlRatio)},
			"tsrelay, no flood", fl.Mbps, true)
	}
	r.add(Row{Section: "abuse", Scenario: sc, Metric: "relay CPU per junk packet", Unit: "µs", Value: fl.CPUPerPacket, Better: "lower",
		Note: "relay process CPU time (user + system) over a 3 s flood with no transfer, less its CPU over a quiet 3 s just before, per packet sent"}, "", 0, false)
	for _, p := range []struct {
		port string
		cpu  float64
		why  string
	}{
		{"the relay port", fl.CPUPerPacketRelay, "Tailscale's udprelay.Server; the kernel drops what its socket filter refuses (all but Geneve as Tailscale sends it and STUN answers) before it wakes the relay"},
		{"STUN", fl.CPUPerPacketSTUN, "ours; the kernel drops what cannot be a binding request before it wakes the relay"},
	} {
		r.add(Row{Section: "abuse", Scenario: "tsrelay, paced junk flood at " + p.port + " alone", Metric: "relay CPU per junk packet", Unit: "µs", Value: p.cpu, Better: "lower",
			Note: fmt.Sprintf("relay process CPU time over a 3 s flood of %d packets/s with no transfer, less its CPU over a quiet 3 s, per packet sent; %s", pacedFloodPPS, p.why)}, "", 0, false)
	}
	r.add(Row{Section: "abuse", Scenario: sc, Metric: "STUN amplification (answer bytes / request bytes)", Unit: "×", Value: fl.STUNAmp, Better: "lower",
		Note: fmt.Sprintf("over IPv4, well-formed binding requests in the paced floods (the most of the rounds); %.2f× over everything a full-speed flood sent to STUN; the relay port sent back %d bytes in all; goal ≤ 1× %s (over IPv6 an answer is 44 bytes to a 40-byte request: 1.1×)", fl.STUNAmpAll, fl.RelayBytesBack, metOrNot(fl.STUNAmp <= 1))}, "", 0, false)
}

// fmtRefused formats refusals by reason, e.g. "accept_rate 800, admit_timeout 12".
func fmtRefused(m map[string]float64) string {
	if len(m) == 0 {
		return "none"
	}
	var parts []string
	for _, k := range []string{"accept_rate", "unadmitted_cap", "source_cap", "admit_timeout", "not_member"} {
		if v := m[k]; v > 0 {
			parts = append(parts, fmt.Sprintf("%s %.0f", k, v))
		}
	}
	return strings.Join(parts, ", ")
}

// memberClients is how many admitted clients memberCost connects.
const memberClients = 500

// memberCost measures what admitted DERP clients cost: a fresh relay
// whose tailnet has memberClients more nodes, its RSS before and after
// that many of them connect to its DERP server (a few at a time, retrying
// what the accept rate refuses).
func (s *derpAbuseSetup) memberCost(ctx context.Context, b *bench) (derpAbuseResult, error) {
	res := derpAbuseResult{Members: memberClients}
	keys := make([]key.NodePrivate, memberClients)
	for i := range keys {
		keys[i] = key.NewNode()
		ip := netip.AddrFrom4([4]byte{100, 65, byte(i >> 8), byte(i)})
		s.tn.control.Server.UpdateNode(&tailcfg.Node{
			ID: tailcfg.NodeID(1000 + i), StableID: tailcfg.StableNodeID("abuse-member-" + strconv.Itoa(i)),
			User: 1, Machine: key.NewMachine().Public(), Key: keys[i].Public(), DiscoKey: key.NewDisco().Public(), MachineAuthorized: true,
			Addresses: []netip.Prefix{netip.PrefixFrom(ip, 32)}, AllowedIPs: []netip.Prefix{netip.PrefixFrom(ip, 32)},
		})
	}
	r, err := s.startRelay(ctx, b, "relay-members")
	if err != nil {
		return res, err
	}
	defer r.Close()
	if res.IdleKiB, err = rssKiB(r.Pid()); err != nil {
		return res, err
	}
	var (
		mu      sync.Mutex
		clients []*derphttp.Client
	)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	work := make(chan key.NodePrivate)
	errc := make(chan error, 8)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for k := range work {
				c, err := s.connectKept(ctx, k)
				if err != nil {
					errc <- err
					return
				}
				mu.Lock()
				clients = append(clients, c)
				mu.Unlock()
			}
		})
	}
	for _, k := range keys {
		select {
		case work <- k:
		case err := <-errc:
			close(work)
			wg.Wait()
			return res, err
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errc:
		return res, err
	default:
	}
	time.Sleep(b.settle())
	res.PeakKiB, err = rssKiB(r.Pid())
	b.cfg.Logf("DERP: %d admitted clients: RSS %.1f → %.1f MiB, %.0f KiB each", memberClients,
		float64(res.IdleKiB)/1024, float64(res.PeakKiB)/1024, float64(res.PeakKiB-res.IdleKiB)/memberClients)
	return res, err
}

// connectKept connects k's DERP client, retrying for up to a minute, and
// returns it connected and admitted, reading (and dropping) what the
// server sends until it is closed.
func (s *derpAbuseSetup) connectKept(ctx context.Context, k key.NodePrivate) (*derphttp.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		c := derphttp.NewRegionClient(k, logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return s.region })
		err := c.Connect(ctx)
		if err == nil {
			var m derp.ReceivedMessage
			if m, err = c.Recv(); err == nil {
				if _, ok := m.(derp.ServerInfoMessage); ok {
					go func() {
						for {
							if _, err := c.Recv(); err != nil {
								return
							}
						}
					}()
					return c, nil
				}
				err = fmt.Errorf("first message %T", m)
			}
		}
		c.Close()
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("member %s: %w (last: %v)", k.Public().ShortString(), ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
