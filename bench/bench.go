// Package bench measures tsrelay against its baselines: the data path
// between two laptops (direct UDP, DERP only, the tsrelay peer relay, a stock
// tailscaled configured as a peer relay by hand), readiness time, memory
// under load and binary size. cmd/bench runs it for `make bench` and `make
// bench-smoke`; see README.md.
//
// Everything runs on this machine, in network namespaces the bench creates
// inside its own (RunIsolated): laptops are kernel-TUN tailscaled processes,
// each in its own namespace on a bridge; relays run in a pod namespace
// behind a node namespace that forwards their UDP port, as a load balancer
// does; Tailscale's test control, DERP and STUN servers run in the bench
// process. iperf3 and ping measure the data path.
package bench

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"tailscale.com/types/logger"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/internal/udpsock"
)

// Config says what to run.
type Config struct {
	// Smoke runs a seconds-long subset: the tsrelay path with one pair,
	// tsrelay readiness and sizes, with 1 s transfers and 10 pings.
	Smoke bool
	// BinDir holds the binaries Build made: relay, tailscaled, tailscale
	// and, if it was built, containerboot.
	BinDir string
	// WorkDir holds the nodes' state and logs; empty means a new
	// temporary directory, removed at the end.
	WorkDir string
	// Transfer is how long each iperf3 run sends (whole seconds); Pings
	// how many ICMP pings each RTT figure is made of. Zero means the mode's
	// default.
	Transfer time.Duration
	Pings    int
	// Rounds is how many times each throughput transfer and each readiness
	// measurement runs; the report shows the median. Zero means 3 (1 with
	// Smoke).
	Rounds int
	// Pairs are the numbers of laptop pairs sending through a relay at
	// once for the memory-under-load rows. Nil means 1, 4 and 8 (1 with
	// Smoke).
	Pairs []int
	// SmallMTU is the pod link MTU of the MTU row (tsrelay behind a pod
	// network that is itself a tunnel; see README's MTU section). Zero
	// means 1230; the row is skipped with Smoke.
	SmallMTU int
	// ProfileDir, if set, receives profiles of tsrelay (TS_DEBUG_PPROF):
	// its heap when idle and after the load, and its CPU while k pairs
	// send through it. Read them with `go tool pprof`.
	ProfileDir string
	// Levers are extra tsrelay configurations for the footprint rows, each
	// a list of environment settings (e.g. GOGC=50), measured like the
	// default and compared with it in the same run.
	Levers [][]string
	// FootprintOnly runs only the relayed scenarios (paths through each
	// relay variant, idle and loaded RSS) and sizes: no direct or DERP
	// path, MTU row or readiness.
	FootprintOnly bool
	// NoFailover skips the failover section; FailoverOnly runs it alone
	// (and the sizes).
	NoFailover, FailoverOnly bool
	// FailoverCases are the failover cases to run (CaseKill, CaseTerm,
	// CaseNode, CaseDrain); nil means all. With Smoke only the first that
	// is not CaseDrain runs, once, with two relays.
	FailoverCases []string
	// FailoverReps is how many trials each failover case gets per
	// topology; zero means 3.
	FailoverReps int
	// FailoverWindow is how long a failover trial waits for the pair to
	// ride a relay again (after the drain, for CaseDrain); zero means 60 s.
	FailoverWindow time.Duration
	// FailoverDrain is CaseDrain's delay between the event and the
	// SIGTERM; zero means 65 s, longer than magicsock's
	// upgradeUDPRelayInterval (1 min), so that peers riding the draining
	// relay rediscover relay paths once during it.
	FailoverDrain time.Duration
	// AbuseOnly runs only the abuse sections (the HTTP port's and the
	// DERP port's, with the UDP flood) and the sizes.
	AbuseOnly bool
	// AbuseEnv is extra relay settings for the DERP abuse section (e.g.
	// TS_DERP_ACCEPT_RATE=100000, to measure what the other limits hold).
	AbuseEnv []string
	// Logf receives progress; nil discards it.
	Logf logger.Logf
}

func (c *Config) defaults() {
	if c.Logf == nil {
		c.Logf = logger.Discard
	}
	if c.Transfer == 0 {
		c.Transfer = 5 * time.Second
		if c.Smoke {
			c.Transfer = time.Second
		}
	}
	c.Transfer = max(c.Transfer.Truncate(time.Second), time.Second)
	if c.Rounds == 0 {
		c.Rounds = 3
		if c.Smoke {
			c.Rounds = 1
		}
	}
	if c.Pings == 0 {
		c.Pings = 200
		if c.Smoke {
			c.Pings = 10
		}
	}
	if c.Pairs == nil {
		c.Pairs = []int{1, 4, 8}
		if c.Smoke {
			c.Pairs = []int{1}
		}
	}
	if c.SmallMTU == 0 {
		c.SmallMTU = 1230
	}
	if c.FailoverCases == nil {
		c.FailoverCases = failoverCases
	}
	if c.FailoverReps == 0 {
		c.FailoverReps = 3
	}
	if c.FailoverWindow == 0 {
		c.FailoverWindow = time.Minute
	}
	if c.FailoverDrain == 0 {
		c.FailoverDrain = 65 * time.Second
	}
}

// Path scenarios.
const (
	scDirect = "direct UDP"
	scDERP   = "DERP only"
	scRelay  = "tsrelay peer relay"
	scRelay6 = "tsrelay peer relay over IPv6"
	scStock  = "stock tailscaled peer relay"
	// The same relays sized for a 16-core node: tsrelay told to bind 16
	// sockets per family, the stock relay with GOMAXPROCS=16 (what a pod
	// without a CPU limit gets there; its socket count follows).
	scRelay16 = "tsrelay peer relay, TS_RELAY_SERVER_SOCKETS=16"
	scStock16 = "stock tailscaled peer relay, GOMAXPROCS=16"
)

// bigNode is the GOMAXPROCS a 16-core node gives a pod without a CPU
// limit. Every relay variant but the stock one at 2 runs with it, so that
// what tsrelay binds by default is seen on such a node.
const bigNode = "GOMAXPROCS=16"

// variant is one relay the relayed scenarios run: tsrelay or the stock
// relay, with extra environment.
type variant struct {
	name  string
	stock bool
	env   []string
	// ipv6: peers reach the relay over IPv6 only; noLoad: no memory rows.
	ipv6, noLoad bool
}

// variants returns the relays to run: tsrelay at its default socket count
// (over IPv4, then over IPv6 with no memory rows) and the stock relay at
// GOMAXPROCS 2 (this machine's) for the path rows;
// then, for the footprint rows, both sized for a 16-core node, and one
// tsrelay per lever.
func (c *Config) variants() []variant {
	vs := []variant{
		{name: scRelay, env: []string{bigNode}},
		{name: scRelay6, env: []string{bigNode}, ipv6: true, noLoad: true},
		{name: scStock, stock: true, env: []string{"GOMAXPROCS=2"}},
	}
	if c.Smoke {
		return vs[:1]
	}
	vs = append(vs,
		variant{name: scRelay16, env: []string{bigNode, "TS_RELAY_SERVER_SOCKETS=16"}},
		variant{name: scStock16, stock: true, env: []string{bigNode}},
	)
	for _, l := range c.Levers {
		vs = append(vs, variant{name: leverName(l), env: append([]string{bigNode}, l...)})
	}
	return vs
}

// leverName is the scenario name of a tsrelay lever variant.
func leverName(env []string) string { return scRelay + ", " + strings.Join(env, " ") }

// Pod link MTU of every relay but the MTU row's: an ordinary pod network.
const podMTU = 1500

// relayPort is the relays' UDP port, in their own pod namespaces.
const relayPort = 40000

// Build builds what the bench runs into dir: relay, tailscaled and tailscale
// at the version go.mod pins, and with containerboot also Tailscale's
// containerboot (for the image-size comparison). Call it before
// RunIsolated: the isolated copy has no network to fetch modules with.
func Build(ctx context.Context, dir string, containerboot bool, logf logger.Logf) error {
	if _, err := tailnettest.Build(ctx, dir); err != nil {
		return err
	}
	if containerboot {
		if err := buildContainerboot(ctx, dir); err != nil {
			logf("containerboot not built, so the size comparison leaves it out: %v", err)
		}
	}
	return nil
}

// Run runs the benchmark. It must run in the copy of the program that
// RunIsolated started, with binaries Build made. It returns the report even
// when a scenario failed (its error is in Report.Errors, and Run returns
// them joined), so that what was measured is not lost.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.defaults()
	start := time.Now()
	rep := newReport(cfg)
	logf := cfg.Logf

	lab, err := newLab(ctx)
	if err != nil {
		return rep, err
	}
	bins := tailnettest.Binaries{
		Tailscaled: filepath.Join(cfg.BinDir, "tailscaled"),
		Tailscale:  filepath.Join(cfg.BinDir, "tailscale"),
		Relay:      filepath.Join(cfg.BinDir, "relay"),
	}
	work := cfg.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "tsrelay-bench-")
		if err != nil {
			return rep, err
		}
		defer os.RemoveAll(d)
		work = d
	}

	var errs []error
	fail := func(scenario string, err error) {
		logf("%s: FAILED: %v", scenario, err)
		rep.Errors = append(rep.Errors, scenario+": "+err.Error())
		errs = append(errs, fmt.Errorf("%s: %w", scenario, err))
	}
	b := &bench{cfg: cfg, lab: lab, bins: bins}

	res := map[string]*pathResult{}
	// FailoverOnly leaves out every section but failover (and sizes);
	// AbuseOnly every section but the abuse ones.
	others := !cfg.FailoverOnly && !cfg.AbuseOnly
	if others && !cfg.Smoke && !cfg.FootprintOnly && ctx.Err() == nil {
		logf("paths: %s and %s", scDirect, scDERP)
		direct, derp, err := b.runUnrelayed(ctx, filepath.Join(work, "unrelayed"))
		if err != nil {
			fail(scDirect+", "+scDERP, err)
		} else {
			res[scDirect], res[scDERP] = direct, derp
		}
	}
	// The IPv6 row comes right after the IPv4 one, so that the two are
	// measured under much the same load on the machine; it has no memory
	// rows.
	variants := cfg.variants()
	for i, v := range variants {
		if ctx.Err() != nil || !others {
			break
		}
		if v.noLoad && cfg.FootprintOnly {
			continue
		}
		logf("path: %s", v.name)
		loads := cfg.Pairs
		if v.noLoad {
			loads = nil
		}
		r, err := b.runRelayed(ctx, filepath.Join(work, "relayed-"+strconv.Itoa(i)), v, podMTU, loads)
		if err != nil {
			fail(v.name, err)
			continue
		}
		res[v.name] = r
	}
	var small *pathResult
	if others && !cfg.Smoke && !cfg.FootprintOnly && ctx.Err() == nil {
		logf("path: %s, pod link MTU %d", scRelay, cfg.SmallMTU)
		small, err = b.runRelayed(ctx, filepath.Join(work, "small-mtu"), variants[0], cfg.SmallMTU, nil)
		if err != nil {
			fail(fmt.Sprintf("%s, MTU %d", scRelay, cfg.SmallMTU), err)
		}
	}
	rep.addPaths(res)
	rep.addMTU(res[scRelay], small, cfg.SmallMTU)
	rep.addSockets(res, variants)
	rep.addLoad(res, variants, cfg.Pairs)

	if others && !cfg.Smoke && !cfg.FootprintOnly && ctx.Err() == nil {
		logf("DERP: first pongs via %s and %s; %s", scOffsiteDERP, scInClusterDERP, scRelayDERPOn)
		d, err := b.runDERP(ctx, filepath.Join(work, "derp"))
		if err != nil {
			fail("DERP", err)
		}
		rep.addDERP(d, res[scRelay])
	}

	// Failover (issue 20): losing the relay a pair rides, one relay
	// against two, and the meshed DERP region losing a node.
	if !cfg.NoFailover && !cfg.FootprintOnly && !cfg.AbuseOnly && ctx.Err() == nil {
		logf("failover: cases %s, %d trials each, one relay and two", strings.Join(cfg.FailoverCases, ","), cfg.FailoverReps)
		f, err := b.runFailover(ctx, filepath.Join(work, "failover"))
		if err != nil {
			fail("failover", err)
		}
		if f != nil {
			logf("failover: the section took %.0f s", f.Seconds)
		}
		rep.addFailover(f)
	}

	if others && !cfg.FootprintOnly && ctx.Err() == nil {
		var rounds []readiness
		for i := range cfg.Rounds {
			logf("readiness, round %d of %d", i+1, cfg.Rounds)
			rd, err := b.runReadiness(ctx, filepath.Join(work, "ready-"+strconv.Itoa(i)))
			if err != nil {
				fail("readiness", err)
				break
			}
			logf("readiness: tsrelay new %.3f s, restart %.3f s; stock new %.3f s, restart %.3f s", rd.RelayNew, rd.RelayRestart, rd.StockNew, rd.StockRestart)
			rounds = append(rounds, rd)
		}
		if len(rounds) > 0 {
			rep.addReadiness(medianReadiness(rounds), len(rounds))
		}
	}

	if (others || cfg.AbuseOnly) && ctx.Err() == nil {
		logf("HTTP port abuse")
		ab, err := b.runHTTPAbuse(ctx, filepath.Join(work, "abuse"))
		if err != nil {
			fail("HTTP abuse", err)
		}
		rep.addAbuse(ab)
	}
	// The DERP port's abuse and the UDP flood (issue 27): not in the
	// smoke run (a minute of attacks), nor with FootprintOnly.
	if (others || cfg.AbuseOnly) && !cfg.Smoke && !cfg.FootprintOnly && ctx.Err() == nil {
		logf("DERP port abuse and UDP flood")
		da, fl, err := b.runDERPAbuse(ctx, filepath.Join(work, "derp-abuse"))
		if err != nil {
			fail("DERP abuse", err)
		}
		rep.addDERPAbuse(da, fl, cfg.AbuseEnv)
	}

	if err := rep.addSizes(bins, filepath.Join(cfg.BinDir, "containerboot")); err != nil {
		fail("sizes", err)
	}
	if err := ctx.Err(); err != nil {
		errs = append(errs, context.Cause(ctx))
	}
	rep.Seconds = time.Since(start).Seconds()
	rep.Machine.LoadEnd = loadAvg()
	return rep, errors.Join(errs...)
}

// bench is one run's setting.
type bench struct {
	cfg  Config
	lab  *lab
	bins tailnettest.Binaries
}

// pathResult is what one path scenario measured.
type pathResult struct {
	Via      string  // the path the pongs took, e.g. peer-relay(10.88.0.3:40000:vni:1)
	Mbps     float64 // iperf3 TCP goodput a → b, median of MbpsRuns
	MbpsRuns []float64
	P50, P99 float64 // ICMP ping RTT, ms
	Pongs    int     // replies (of Config.Pings)
	// For the relay scenarios: the relay's RSS when ready with no peers,
	// and its peak while k pairs send through it at once (KiB).
	RelayIdleKiB int64
	RelayIdle    map[string]int64 // its /proc status figures then (KiB)
	Load         map[int]load
	// RelayAfter is its /proc status figures (KiB) afterSettle after the
	// last load ended: what it keeps once traffic stops.
	RelayAfter   map[string]int64
	AfterSeconds float64 // how long after the load RelayAfter was read
	// Sockets is how many UDP sockets the relay had bound on its port.
	Sockets udpsock.Counts
	// MTUWarning is tsrelay's tsrelay_path_mtu_too_small gauge after the
	// transfers (-1: not exported).
	MTUWarning float64
	// Forwarded is tsrelay's tailscaled_peer_relay_forwarded_packets_total
	// after the transfers, by "transport_in→transport_out" (e.g.
	// "udp6→udp6"); nil for the stock relay.
	Forwarded map[string]float64
}

// load is what one "k pairs at once" run measured.
type load struct {
	PeakKiB int64
	Mbps    float64 // the pairs' goodput, summed
	// CPUPerGB is the relay's CPU time (user + system) per gigabyte the
	// pairs received.
	CPUPerGB float64
}

// closers runs cleanup functions in reverse order.
type closers []func()

func (c *closers) add(f func()) { *c = append(*c, f) }
func (c *closers) run() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
}

// tailnet is one scenario's world: a control server and the namespaces and
// processes started for it, all undone by close.
type tailnet struct {
	*bench
	dir     string
	control *tailnettest.Control
	// ipv6 gives the hosts IPv6 addresses and makes pods reachable over
	// IPv6 only (lab.pod).
	ipv6 bool

	mu sync.Mutex // guards cl: pairs start in parallel
	cl closers
}

// cleanup adds f to what close undoes.
func (tn *tailnet) cleanup(f func()) {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	tn.cl.add(f)
}

func (b *bench) newTailnet(dir string) (*tailnet, error) {
	c, err := tailnettest.StartControlAt(worldGateway, nil)
	if err != nil {
		return nil, err
	}
	tn := &tailnet{bench: b, dir: dir, control: c}
	tn.cl.add(c.Close)
	return tn, nil
}

func (tn *tailnet) close() { tn.cl.run() }

// laptop starts a kernel-TUN tailscaled in a new namespace and joins it to
// the tailnet.
func (tn *tailnet) laptop(ctx context.Context, name string, allowDirect bool) (*tailnettest.Laptop, string, error) {
	ns, _, _, err := tn.lab.host(ctx, name, tn.ipv6)
	tn.cleanup(func() { remove(ns) })
	if err != nil {
		return nil, "", err
	}
	l, err := tailnettest.StartLaptopWith(ctx, tn.bins, filepath.Join(tn.dir, name), name,
		tailnettest.LaptopOptions{Netns: ns, KernelTUN: true, AllowDirect: allowDirect})
	if err != nil {
		return nil, "", err
	}
	tn.cleanup(func() { l.Close() })
	if err := l.Up(ctx, tn.control.URL, tn.control.AuthKey); err != nil {
		return nil, "", fmt.Errorf("%w\n%s", err, l.LogTail(20))
	}
	return l, ns, nil
}

// pair is two laptops, a sending to b, with an iperf3 server on b.
type pair struct {
	a, b     *tailnettest.Laptop
	nsA, nsB string
	ipB      netip.Addr
}

func (tn *tailnet) pair(ctx context.Context, name string, allowDirect bool) (*pair, error) {
	p := &pair{}
	var err error
	if p.a, p.nsA, err = tn.laptop(ctx, name+"a", allowDirect); err != nil {
		return nil, err
	}
	if p.b, p.nsB, err = tn.laptop(ctx, name+"b", allowDirect); err != nil {
		return nil, err
	}
	if p.ipB, err = p.b.IP(ctx); err != nil {
		return nil, err
	}
	if err := p.a.WaitForPeer(ctx, p.ipB); err != nil {
		return nil, err
	}
	srv, err := startIperfServer(ctx, tn.dir, p.nsB, p.ipB)
	if err != nil {
		return nil, err
	}
	tn.cleanup(func() { srv.Close() })
	return p, nil
}

// pairs starts n pairs, four at a time.
func (tn *tailnet) pairs(ctx context.Context, n int) ([]*pair, error) {
	ps := make([]*pair, n)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for i := range ps {
		g.Go(func() (err error) {
			ps[i], err = tn.pair(gctx, "p"+strconv.Itoa(i), false)
			return err
		})
	}
	return ps, g.Wait()
}

// pod creates a node and a pod namespace for a relay on a link of the
// given MTU.
func (tn *tailnet) pod(ctx context.Context, name string, mtu int) (pod, error) {
	p, err := tn.lab.pod(ctx, name, relayPort, mtu, tn.ipv6)
	tn.cleanup(func() { remove(p.Netns, p.Netns+"-node") })
	return p, err
}

// startTSRelay starts the relay binary in p, configured as in a cluster
// with a load balancer: its static endpoint is the node's forwarded port.
func (tn *tailnet) startTSRelay(ctx context.Context, p pod, dir string, withKey bool, extraEnv ...string) (*tailnettest.Relay, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	env := []string{
		"TS_CONTROL_URL=" + tn.control.URL,
		"TS_STATE_DIR=" + filepath.Join(dir, "state"),
		"TS_HOSTNAME=relay",
		"TS_RELAY_SERVER_PORT=" + strconv.Itoa(relayPort),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS=" + p.LB.String(),
	}
	if withKey {
		env = append(env, "TS_AUTHKEY="+tn.control.AuthKey)
	}
	if tn.cfg.ProfileDir != "" {
		env = append(env, "TS_DEBUG_PPROF=true")
	}
	env = append(env, extraEnv...)
	return tailnettest.StartRelayInNetns(ctx, tn.bins, p.Netns, "relay", filepath.Join(dir, "relay.log"), env...)
}

// waitReadyz polls the relay's /readyz every 10 ms until it answers 200.
func waitReadyz(ctx context.Context, r *tailnettest.Relay) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	r.Poll = 10 * time.Millisecond
	if err := r.WaitReady(ctx, nil); err != nil {
		return fmt.Errorf("tsrelay never ready: %w\n%s", err, r.LogTail(20))
	}
	return nil
}

// startStock starts the baseline in p: a stock tailscaled (the same
// version) in userspace-networking mode, as the tailscale/tailscale image
// runs it by default. With up it is then made a peer relay the way users do
// by hand: `tailscale up`, then `tailscale set --relay-server-port=…
// --relay-server-static-endpoints=…`; without, it is expected to resume from
// its saved state. It returns once the relay socket is bound.
func (tn *tailnet) startStock(ctx context.Context, p pod, dir string, up bool, env ...string) (*tailnettest.Laptop, error) {
	l, err := tailnettest.StartLaptopWith(ctx, tn.bins, dir, "stock-relay",
		tailnettest.LaptopOptions{Netns: p.Netns, AllowDirect: true, Poll: 5 * time.Millisecond, Env: env})
	if err != nil {
		return nil, err
	}
	err = func() error {
		if !up {
			return l.WaitRunning(ctx)
		}
		if err := l.Up(ctx, tn.control.URL, tn.control.AuthKey); err != nil {
			return err
		}
		_, err := l.CLI(ctx, "set", "--relay-server-port="+strconv.Itoa(relayPort), "--relay-server-static-endpoints="+p.LB.String())
		return err
	}()
	if err == nil {
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		err = tailnettest.WaitFor(wctx, 5*time.Millisecond, func() (bool, error) {
			st, err := l.LocalClient().DebugPeerRelaySessions(wctx)
			return err == nil && st.UDPPort != nil, nil
		})
		cancel()
	}
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("stock relay: %w\n%s", err, l.LogTail(20))
	}
	return l, nil
}

// runUnrelayed measures the direct and the DERP-only path, on one tailnet
// with no relay: pair d may use direct UDP, pair n may not.
func (b *bench) runUnrelayed(ctx context.Context, dir string) (direct, derp *pathResult, err error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	tn, err := b.newTailnet(dir)
	if err != nil {
		return nil, nil, err
	}
	defer tn.close()
	d, err := tn.pair(ctx, "d", true)
	if err != nil {
		return nil, nil, err
	}
	n, err := tn.pair(ctx, "n", false)
	if err != nil {
		return nil, nil, err
	}
	if direct, err = b.measurePath(ctx, scDirect, d, pathDirect); err != nil {
		return nil, nil, err
	}
	if derp, err = b.measurePath(ctx, scDERP, n, pathDERP); err != nil {
		return nil, nil, err
	}
	return direct, derp, nil
}

// runRelayed starts the relay v (tsrelay or the stock baseline) in a pod
// with the given link MTU, records its idle RSS, measures the path of one
// pair through it, then its peak RSS while each count in loads of pairs
// sends through it at once, and what it still holds afterSettle later.
// With v.ipv6 the peers reach the relay over IPv6 only, and the path must
// show its IPv6 load-balancer address.
func (b *bench) runRelayed(ctx context.Context, dir string, v variant, mtu int, loads []int) (*pathResult, error) {
	sc, ipv6 := v.name, v.ipv6
	ctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	tn, err := b.newTailnet(dir)
	if err != nil {
		return nil, err
	}
	defer tn.close()
	tn.ipv6 = ipv6
	p, err := tn.pod(ctx, "relay", mtu)
	if err != nil {
		return nil, err
	}
	var pid int
	var ts *tailnettest.Relay
	if v.stock {
		l, err := tn.startStock(ctx, p, filepath.Join(dir, "relay"), true, v.env...)
		if err != nil {
			return nil, err
		}
		tn.cleanup(func() { l.Close() })
		pid = l.Pid()
	} else {
		if ts, err = tn.startTSRelay(ctx, p, filepath.Join(dir, "relay"), true, v.env...); err != nil {
			return nil, err
		}
		tn.cleanup(func() { ts.Close() })
		if err := waitReadyz(ctx, ts); err != nil {
			return nil, err
		}
		pid = ts.Pid()
	}
	// Idle: ready, settled, before any laptop joins.
	time.Sleep(b.settle())
	idle, err := procStatus(pid)
	if err != nil {
		return nil, err
	}
	b.profile(ctx, ts, fmt.Sprintf("%s-mtu%d-idle.heap", filepath.Base(dir), mtu), "/debug/pprof/heap")

	n := 1
	for _, k := range loads {
		n = max(n, k)
	}
	b.cfg.Logf("%s: starting %d laptop pairs", sc, n)
	pairs, err := tn.pairs(ctx, n)
	if err != nil {
		return nil, err
	}
	res, err := b.measurePath(ctx, sc, pairs[0], pathRelay)
	if err != nil {
		return nil, err
	}
	if want := "peer-relay(" + p.LB.String() + ":vni:"; ipv6 && !strings.HasPrefix(res.Via, want) {
		return nil, fmt.Errorf("relayed path went via %s, want %s…): not the relay's IPv6 address", res.Via, want)
	}
	res.RelayIdleKiB, res.RelayIdle = idle["VmRSS"], idle
	res.MTUWarning = -1
	if ts != nil {
		if fams, err := ts.Metrics(ctx); err == nil {
			if v, ok := tailnettest.MetricSum(fams, "tsrelay_path_mtu_too_small"); ok {
				res.MTUWarning = v
			}
			res.Forwarded = map[string]float64{}
			for _, in := range []string{"udp4", "udp6"} {
				for _, out := range []string{"udp4", "udp6"} {
					v, _ := tailnettest.MetricSum(fams, "tailscaled_peer_relay_forwarded_packets_total", "transport_in", in, "transport_out", out)
					res.Forwarded[in+"→"+out] = v
				}
			}
		}
	}
	if ipv6 && res.Forwarded["udp6→udp6"] == 0 {
		return nil, fmt.Errorf("tsrelay forwarded no packets from udp6 to udp6 (%v)", res.Forwarded)
	}

	res.Load = map[int]load{}
	for _, k := range loads {
		var g errgroup.Group
		g.Go(func() error {
			secs := int(b.loadTransfer().Seconds())
			b.profile(ctx, ts, fmt.Sprintf("%s-mtu%d-%dpairs.cpu", filepath.Base(dir), mtu, k), "/debug/pprof/profile?seconds="+strconv.Itoa(secs))
			return nil
		})
		l, err := b.loadRelay(ctx, pid, pairs[:k])
		g.Wait()
		if err != nil {
			return nil, fmt.Errorf("%d pairs at once: %w", k, err)
		}
		b.cfg.Logf("%s: %d pairs at once: %.0f Mbit/s in all, relay RSS peak %.1f MiB", sc, k, l.Mbps, float64(l.PeakKiB)/1024)
		res.Load[k] = l
	}
	b.profile(ctx, ts, fmt.Sprintf("%s-mtu%d-loaded.heap", filepath.Base(dir), mtu), "/debug/pprof/heap")
	if len(loads) > 0 {
		// What the relay keeps once the traffic has stopped. The laptops
		// stay up, idle, as a user's would.
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-time.After(b.afterSettle()):
		}
		if res.RelayAfter, err = procStatus(pid); err != nil {
			return nil, err
		}
		res.AfterSeconds = b.afterSettle().Seconds()
		b.cfg.Logf("%s: %v after the load: RSS %.1f MiB (%s)", sc, b.afterSettle(), float64(res.RelayAfter["VmRSS"])/1024, rssParts(res.RelayAfter))
	}
	// How many sockets the relay bound on its port: what its buffers scale
	// with.
	if res.Sockets, err = udpsock.Count(pid, relayPort); err != nil {
		return nil, err
	}
	return res, nil
}

// profile saves tsrelay's profile at path to Config.ProfileDir/name, when
// profiling and r is tsrelay. A failure is logged, not fatal.
func (b *bench) profile(ctx context.Context, r *tailnettest.Relay, name, path string) {
	if b.cfg.ProfileDir == "" || r == nil {
		return
	}
	code, body, err := r.Get(ctx, path)
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("HTTP %d", code)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(b.cfg.ProfileDir, "tsrelay-"+name), []byte(body), 0o644)
	}
	if err != nil {
		b.cfg.Logf("profile %s: %v", name, err)
	}
}

// loadRelay has every pair send through the relay at once (after checking
// that each pair's path is the relay) and samples the relay's RSS.
func (b *bench) loadRelay(ctx context.Context, pid int, pairs []*pair) (load, error) {
	g, gctx := errgroup.WithContext(ctx)
	for _, p := range pairs {
		g.Go(func() error {
			wctx, cancel := context.WithTimeout(gctx, 45*time.Second)
			defer cancel()
			_, err := waitPath(wctx, p.a, p.ipB, pathRelay)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return load{}, err
	}
	s := sampleRSS(pid)
	cpu0, err := cpuSeconds(pid)
	if err != nil {
		s.Stop()
		return load{}, err
	}
	mbps := make([]float64, len(pairs))
	g, gctx = errgroup.WithContext(ctx)
	for i, p := range pairs {
		g.Go(func() (err error) {
			mbps[i], err = throughput(gctx, p.nsA, p.ipB, b.loadTransfer())
			return err
		})
	}
	err = g.Wait()
	l := load{PeakKiB: s.Stop()}
	for _, m := range mbps {
		l.Mbps += m
	}
	if cpu1, cerr := cpuSeconds(pid); cerr == nil && l.Mbps > 0 {
		gb := l.Mbps * b.loadTransfer().Seconds() / 8 / 1000
		l.CPUPerGB = (cpu1 - cpu0) / gb
	}
	return l, err
}

// errPathLost is measureOnce's error when the pair was off its path after
// the transfers.
var errPathLost = errors.New("path lost during the transfers")

// measurePath checks that p.a reaches p.b over want, and measures ping RTT
// and iperf3 throughput; then checks the path again. On 2 shared cores a
// pair sometimes loses the relay path under a transfer and falls back to
// DERP until its next relay-path discovery (up to 30 s), which would count
// DERP's throughput as the relay's: such a measurement is made again, once.
func (b *bench) measurePath(ctx context.Context, sc string, p *pair, want pathKind) (*pathResult, error) {
	res, err := b.measureOnce(ctx, sc, p, want)
	if errors.Is(err, errPathLost) {
		b.cfg.Logf("%s: %v; measuring again", sc, err)
		res, err = b.measureOnce(ctx, sc, p, want)
	}
	return res, err
}

// measureOnce is one measurePath attempt.
func (b *bench) measureOnce(ctx context.Context, sc string, p *pair, want pathKind) (*pathResult, error) {
	res := &pathResult{}
	pctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	via, err := waitPath(pctx, p.a, p.ipB, want)
	cancel()
	if err != nil {
		return nil, err
	}
	res.Via = via
	rtts, err := pingRTT(ctx, p.nsA, p.ipB, b.cfg.Pings)
	if err != nil {
		return nil, err
	}
	res.Pongs = len(rtts)
	res.P50, res.P99 = percentile(rtts, 50), percentile(rtts, 99)
	if !b.cfg.Smoke {
		// Warm-up, not counted: the first transfer on a new path is the
		// slowest (WireGuard handshakes, path discovery).
		if _, err := throughput(ctx, p.nsA, p.ipB, time.Second); err != nil {
			return nil, fmt.Errorf("warm-up transfer: %w", err)
		}
	}
	for range b.cfg.Rounds {
		mbps, err := throughput(ctx, p.nsA, p.ipB, b.cfg.Transfer)
		if err != nil {
			return nil, err
		}
		res.MbpsRuns = append(res.MbpsRuns, mbps)
	}
	res.Mbps = percentile(res.MbpsRuns, 50)
	// The data must have taken the same path as the pings.
	vctx, vcancel := context.WithTimeout(ctx, 10*time.Second)
	after, err := waitPath(vctx, p.a, p.ipB, want)
	vcancel()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errPathLost, err)
	}
	if after != res.Via {
		b.cfg.Logf("%s: path changed during the run: %s → %s", sc, res.Via, after)
	}
	b.cfg.Logf("%s: %.0f Mbit/s %s, RTT p50 %.3f ms p99 %.3f ms, via %s", sc, res.Mbps, fmtRuns(res.MbpsRuns), res.P50, res.P99, res.Via)
	return res, nil
}

func (b *bench) settle() time.Duration {
	if b.cfg.Smoke {
		return 500 * time.Millisecond
	}
	return 2 * time.Second
}

// afterSettle is how long after the last load the relay's RSS is read
// again: long enough for tsrelay's ReturnFreeMemory (which looks every 5 s
// and wants one whole quiet interval) to act.
func (b *bench) afterSettle() time.Duration {
	if b.cfg.Smoke {
		return time.Second
	}
	return 15 * time.Second
}

func (b *bench) loadTransfer() time.Duration {
	if b.cfg.Smoke {
		return time.Second
	}
	return 3 * time.Second
}

// readiness is what the readiness scenario measured, in seconds; a
// negative value was not measured.
type readiness struct {
	RelayNew, RelayRestart float64
	StockNew, StockRestart float64
}

// medianReadiness is the per-field median of rounds (negative: not measured).
func medianReadiness(rounds []readiness) readiness {
	med := func(f func(readiness) float64) float64 {
		var xs []float64
		for _, r := range rounds {
			xs = append(xs, f(r))
		}
		return percentile(xs, 50)
	}
	return readiness{
		RelayNew:     med(func(r readiness) float64 { return r.RelayNew }),
		RelayRestart: med(func(r readiness) float64 { return r.RelayRestart }),
		StockNew:     med(func(r readiness) float64 { return r.StockNew }),
		StockRestart: med(func(r readiness) float64 { return r.StockRestart }),
	}
}

// runReadiness times, on a fresh tailnet and in pods: tsrelay from process
// start to /readyz 200 with a new identity and again from the saved state;
// the stock tailscaled from process start through `tailscale up` and
// `tailscale set --relay-server-port` to a bound relay socket, and again
// from its saved state (which keeps the relay prefs) to a bound socket.
func (b *bench) runReadiness(ctx context.Context, dir string) (readiness, error) {
	rd := readiness{-1, -1, -1, -1}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	tn, err := b.newTailnet(dir)
	if err != nil {
		return rd, err
	}
	defer tn.close()
	rp, err := tn.pod(ctx, "relay", podMTU)
	if err != nil {
		return rd, err
	}

	// tsrelay, new identity.
	t0 := time.Now()
	r, err := tn.startTSRelay(ctx, rp, filepath.Join(dir, "relay"), true)
	if err != nil {
		return rd, err
	}
	if err := waitReadyz(ctx, r); err != nil {
		r.Close()
		return rd, err
	}
	rd.RelayNew = time.Since(t0).Seconds()
	if err := r.Close(); err != nil {
		return rd, fmt.Errorf("stop tsrelay: %w", err)
	}

	var sp pod
	if !b.cfg.Smoke {
		if sp, err = tn.pod(ctx, "stock", podMTU); err != nil {
			return rd, err
		}
		t0 = time.Now()
		n, err := tn.startStock(ctx, sp, filepath.Join(dir, "stock"), true)
		if err != nil {
			return rd, err
		}
		rd.StockNew = time.Since(t0).Seconds()
		if err := n.Close(); err != nil {
			return rd, fmt.Errorf("stop stock relay: %w", err)
		}
	}

	// Restarts from saved state, with no auth key: testcontrol checks the
	// key on every register request, unlike Tailscale's control.
	tn.control.AllowRegisterWithoutKey()
	t0 = time.Now()
	r, err = tn.startTSRelay(ctx, rp, filepath.Join(dir, "relay"), false)
	if err != nil {
		return rd, err
	}
	err = waitReadyz(ctx, r)
	rd.RelayRestart = time.Since(t0).Seconds()
	r.Close()
	if err != nil {
		return rd, fmt.Errorf("restart: %w", err)
	}

	if !b.cfg.Smoke {
		t0 = time.Now()
		n, err := tn.startStock(ctx, sp, filepath.Join(dir, "stock"), false)
		if err != nil {
			return rd, fmt.Errorf("restart: %w", err)
		}
		rd.StockRestart = time.Since(t0).Seconds()
		n.Close()
	}
	return rd, nil
}

// buildContainerboot builds Tailscale's containerboot (the tailscale/tailscale
// image's entry point) at the version go.mod pins, stripped and static like
// the other binaries, into dir. It needs modules this module does not
// require (the Kubernetes operator's), so it is built in a throwaway module
// next to it; a second call finds it built.
func buildContainerboot(ctx context.Context, dir string) error {
	out := filepath.Join(dir, "containerboot")
	ver := tailscaleModVersion()
	stamp := out + ".version"
	if b, err := os.ReadFile(stamp); err == nil && string(b) == ver {
		return nil
	}
	if ver == "" {
		return errors.New("no tailscale.com version in this program's build info")
	}
	mod, err := os.MkdirTemp("", "tsrelay-containerboot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(mod)
	if err := os.WriteFile(filepath.Join(mod, "go.mod"), []byte("module containerbootbuild\n\ngo 1.26\n"), 0o644); err != nil {
		return err
	}
	absOut, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	for _, args := range [][]string{
		{"get", "tailscale.com/cmd/containerboot@" + ver},
		{"build", "-trimpath", "-ldflags=-s -w", "-o", absOut, "tailscale.com/cmd/containerboot"},
	} {
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = mod
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local")
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go %s: %w\n%s", args[0], err, lastLines(string(b), 5))
		}
	}
	return os.WriteFile(stamp, []byte(ver), 0o644)
}

// binSize is the size of a file in bytes.
func binSize(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}
