package bench

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

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
