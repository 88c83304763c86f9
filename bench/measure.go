package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
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
func waitPath(ctx context.Context, n *tailnettest.Laptop, ip netip.Addr, want pathKind) (string, error) {
	r, last, err := pingUntil(ctx, n, ip, 200*time.Millisecond, func(r *ipnstate.PingResult) bool { return kindOf(r) == want })
	if err != nil {
		return "", fmt.Errorf("path to %v never became %s (last pong: %s): %w", ip, want, last, err)
	}
	return describe(r), nil
}

// pingUntil disco-pings ip from n, every pause after an answer or a
// timeout, until a pong is accepted, and returns it. Until ctx is done:
// then the error is ctx's cause, and last says what the last ping got.
func pingUntil(ctx context.Context, n *tailnettest.Laptop, ip netip.Addr, pause time.Duration, accept func(*ipnstate.PingResult) bool) (_ *ipnstate.PingResult, last string, _ error) {
	for {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		r, err := n.LocalClient().Ping(pctx, ip, tailcfg.PingDisco)
		cancel()
		switch {
		case err != nil:
			last = err.Error()
		case r.Err != "":
			last = r.Err
		default:
			last = describe(r)
			if accept(r) {
				return r, last, nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, last, context.Cause(ctx)
		case <-time.After(pause):
		}
	}
}

// pingRTT sends count ICMP echo requests, 10 ms apart, from namespace ns to
// ip through the tailnet (kernel TUN, WireGuard, the path under test), and
// returns the round-trip times of the replies in milliseconds.
func pingRTT(ctx context.Context, ns string, ip netip.Addr, count int) ([]float64, error) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", ns,
		"ping", "-n", "-c", strconv.Itoa(count), "-i", "0.01", "-W", "2", ip.String()).CombinedOutput()
	rtts := parsePing(string(out))
	if len(rtts) == 0 {
		return nil, fmt.Errorf("ping %v from %s: no reply (%v): %s", ip, ns, err, lastLines(string(out), 3))
	}
	return rtts, nil
}

// parsePing returns the "time=… ms" figures of ping's per-reply lines.
func parsePing(out string) []float64 {
	var rtts []float64
	for _, l := range strings.Split(out, "\n") {
		_, v, ok := strings.Cut(l, " time=")
		if !ok {
			continue
		}
		v, _, _ = strings.Cut(v, " ")
		if x, err := strconv.ParseFloat(v, 64); err == nil {
			rtts = append(rtts, x)
		}
	}
	return rtts
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-n):], " / ")
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

// iperfPort is where each laptop b's iperf3 server listens, on its tailnet
// address.
const iperfPort = "5201"

// startIperfServer starts iperf3 in server mode in namespace ns, bound to
// the tailnet address ip, and waits until it listens.
func startIperfServer(ctx context.Context, dir, ns string, ip netip.Addr) (*tailnettest.Process, error) {
	p, err := tailnettest.StartProcess(ctx, tailnettest.ProcessConfig{
		Name:    "iperf3[" + ns + "]",
		Path:    "iperf3",
		Args:    []string{"--server", "--bind", ip.String(), "--port", iperfPort, "--forceflush"},
		Netns:   ns,
		LogFile: filepath.Join(dir, "iperf3-"+ns+".log"),
	})
	if err != nil {
		return nil, err
	}
	err = tailnettest.WaitFor(ctx, 10*time.Millisecond, func() (bool, error) {
		select {
		case <-p.Done():
			return false, fmt.Errorf("iperf3 server exited: %v: %s", p.Wait(ctx), p.LogTail(5))
		default:
		}
		b, _ := os.ReadFile(p.LogPath())
		return strings.Contains(string(b), "Server listening"), nil
	})
	if err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// throughput runs an iperf3 TCP test for d from namespace ns to the server
// on ip and returns the receiver's goodput in Mbit/s. The first second
// (TCP slow start) is left out of tests longer than 2 s.
func throughput(ctx context.Context, ns string, ip netip.Addr, d time.Duration) (float64, error) {
	args := []string{"netns", "exec", ns, "iperf3", "--client", ip.String(), "--port", iperfPort,
		"--time", strconv.Itoa(int(d.Seconds())), "--json"}
	if d > 2*time.Second {
		args = append(args, "--omit", "1")
	}
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		out, err := exec.CommandContext(ctx, "ip", args...).Output()
		var res struct {
			Error string `json:"error"`
			End   struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if jerr := json.Unmarshal(out, &res); jerr != nil {
			last = fmt.Errorf("iperf3 to %v from %s: %v; output: %s", ip, ns, err, lastLines(string(out), 3))
		} else if res.Error != "" {
			// The server serves one test at a time; a busy or not yet
			// reachable server is worth another try.
			last = fmt.Errorf("iperf3 to %v from %s: %s", ip, ns, res.Error)
		} else if res.End.SumReceived.BitsPerSecond > 0 {
			return res.End.SumReceived.BitsPerSecond / 1e6, nil
		} else {
			last = fmt.Errorf("iperf3 to %v from %s: no data received", ip, ns)
		}
		select {
		case <-ctx.Done():
			return 0, context.Cause(ctx)
		case <-time.After(time.Second):
		}
	}
	return 0, last
}

// rssKiB returns a process's resident set size (VmRSS) in KiB.
func rssKiB(pid int) (int64, error) {
	m, err := procStatus(pid)
	return m["VmRSS"], err
}

// procStatus returns the kB figures of /proc/<pid>/status (VmRSS, RssAnon,
// RssFile, …), in KiB.
func procStatus(pid int) (map[string]int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, err
	}
	m := map[string]int64{}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		v, isKB := strings.CutSuffix(strings.TrimSpace(v), " kB")
		if !ok || !isKB {
			continue
		}
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			m[k] = n
		}
	}
	if _, ok := m["VmRSS"]; !ok {
		return nil, fmt.Errorf("no VmRSS for pid %d", pid)
	}
	return m, nil
}

// cpuSeconds returns the user plus system CPU time a process has used.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which may hold spaces: state is the
	// first, utime and stime the 12th and 13th (stat(5): 14 and 15).
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	var ticks float64
	for _, s := range f[11:13] {
		n, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return ticks / 100, nil // USER_HZ is 100 on Linux
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
