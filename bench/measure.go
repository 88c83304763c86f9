package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
)

// pathKind is the way a disco ping's pong came back.
type pathKind string

const (
	pathDirect pathKind = "direct"
	pathDERP   pathKind = "derp"
	pathRelay  pathKind = "peer-relay"
)

func kindOf(r *ipnstate.PingResult) pathKind {
	switch {
	case r.PeerRelay != "":
		return pathRelay
	case r.Endpoint != "":
		return pathDirect
	case r.DERPRegionID != 0:
		return pathDERP
	}
	return "unknown"
}

func describe(r *ipnstate.PingResult) string {
	switch kindOf(r) {
	case pathRelay:
		return "peer-relay(" + r.PeerRelay + ")"
	case pathDirect:
		return r.Endpoint
	case pathDERP:
		return "DERP(" + r.DERPRegionCode + ")"
	}
	return "?"
}

// waitPath disco-pings ip from n until a pong comes back over want, and
// returns that path's description.
func waitPath(ctx context.Context, n *node, ip netip.Addr, want pathKind) (string, error) {
	var last string
	for {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		r, err := n.lc.Ping(pctx, ip, tailcfg.PingDisco)
		cancel()
		switch {
		case err != nil:
			last = err.Error()
		case r.Err != "":
			last = r.Err
		default:
			last = describe(r)
			if kindOf(r) == want {
				return last, nil
			}
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("path to %v never became %s (last pong: %s): %w", ip, want, last, context.Cause(ctx))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// pingRTT sends count disco pings, 10 ms apart, and returns the round-trip
// times of the pongs that came back over want, in milliseconds.
func pingRTT(ctx context.Context, n *node, ip netip.Addr, count int, want pathKind) (rtts []float64, other int, err error) {
	for range count {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		r, err := n.lc.Ping(pctx, ip, tailcfg.PingDisco)
		cancel()
		if err != nil {
			return rtts, other, err
		}
		if r.Err != "" {
			return rtts, other, errors.New(r.Err)
		}
		if kindOf(r) != want {
			other++
		} else {
			rtts = append(rtts, r.LatencySeconds*1000)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(rtts) == 0 {
		return nil, other, fmt.Errorf("no pong of %d came over %s", count, want)
	}
	return rtts, other, nil
}

// percentile returns the p-th percentile (nearest rank) of xs.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(p/100*float64(len(s))+0.999999) - 1
	i = max(0, min(i, len(s)-1))
	return s[i]
}

// throughput sends data over TCP from a to b's tailnet address for d and
// returns the goodput the receiver saw, in Mbit/s. The receiver is a
// listener on 127.0.0.1 in this process: b runs in userspace-networking
// mode, whose netstack hands TCP to its own tailnet IP to the host's
// loopback on the same port. a's side is a LocalAPI dial (a's netstack).
func throughput(ctx context.Context, a *node, ipB netip.Addr, d time.Duration) (float64, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	type result struct {
		n           int64
		first, last time.Time
		err         error
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		var r result
		buf := make([]byte, 256<<10)
		for {
			k, err := c.Read(buf)
			if k > 0 {
				now := time.Now()
				if r.n == 0 {
					r.first = now
				}
				r.n += int64(k)
				r.last = now
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					r.err = err
				}
				done <- r
				return
			}
		}
	}()

	conn, err := a.lc.DialTCP(ctx, ipB.String(), uint16(port))
	if err != nil {
		return 0, fmt.Errorf("dial %v:%d through %s: %w", ipB, port, a.name, err)
	}
	buf := make([]byte, 64<<10)
	end := time.Now().Add(d)
	conn.SetWriteDeadline(end.Add(10 * time.Second))
	for time.Now().Before(end) {
		if _, err := conn.Write(buf); err != nil {
			conn.Close()
			return 0, fmt.Errorf("write: %w", err)
		}
	}
	conn.Close()
	select {
	case r := <-done:
		if r.err != nil {
			return 0, fmt.Errorf("receive: %w", r.err)
		}
		el := r.last.Sub(r.first).Seconds()
		if r.n == 0 || el <= 0 {
			return 0, fmt.Errorf("received %d bytes", r.n)
		}
		return float64(r.n) * 8 / el / 1e6, nil
	case <-time.After(15 * time.Second):
		return 0, errors.New("receiver did not see the end of the stream within 15 s")
	case <-ctx.Done():
		return 0, context.Cause(ctx)
	}
}

// rssKiB returns a process's resident set size (VmRSS) in KiB.
func rssKiB(pid int) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

// rssSampler records the peak RSS of a process every 50 ms until stopped.
type rssSampler struct {
	stop chan struct{}
	wg   sync.WaitGroup
	peak int64
}

func sampleRSS(pid int) *rssSampler {
	s := &rssSampler{stop: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			if v, err := rssKiB(pid); err == nil {
				s.peak = max(s.peak, v)
			}
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// Stop ends sampling and returns the peak in KiB (0 for a nil sampler).
func (s *rssSampler) Stop() int64 {
	if s == nil {
		return 0
	}
	close(s.stop)
	s.wg.Wait()
	return s.peak
}
