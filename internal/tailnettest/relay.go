package tailnettest

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/tsrelay/tsrelay/internal/readyz"
)

// Relay is the real relay binary (cmd/relay) running as a subprocess,
// configured only through its environment, as in a pod.
type Relay struct {
	*Process
	// HTTPAddr is the relay's TS_LOCAL_ADDR_PORT, on 127.0.0.1 (of Netns,
	// if set).
	HTTPAddr string
	// Netns is the named network namespace the relay runs in; empty means
	// the caller's.
	Netns string
	// Poll is how often WaitReady asks; zero means 50 ms. Timing
	// measurements want less.
	Poll time.Duration

	client *http.Client
}

// StartRelay starts bins.Relay with env added to an environment that keeps it
// on this machine: TS_NO_LOGS_NO_SUPPORT stops log uploads (and the fallback
// dials to Tailscale's public DERP servers), TS_DISABLE_PORTMAPPER stops
// UPnP/PCP probes of the gateway, TS_PANIC_IF_HIT_MAIN_CONTROL turns a dial
// to Tailscale's control into a crash, and TS_ASSUME_NETWORK_UP_FOR_TEST lets
// it run in a network namespace with only loopback. Its HTTP server gets a
// free port on 127.0.0.1; its output goes to logFile.
func StartRelay(ctx context.Context, bins Binaries, name, logFile string, env ...string) (*Relay, error) {
	httpAddr, err := FreeTCPAddr()
	if err != nil {
		return nil, err
	}
	p, err := StartProcess(ctx, ProcessConfig{
		Name:    name,
		Path:    bins.Relay,
		LogFile: logFile,
		Env:     append(append(OffMachineEnv(), "TS_LOCAL_ADDR_PORT="+httpAddr), env...),
	})
	if err != nil {
		return nil, err
	}
	return &Relay{Process: p, HTTPAddr: httpAddr, client: http.DefaultClient}, nil
}

// StartRelayInNetns is StartRelay in the named network namespace netns
// (`ip netns add`), for example a pod's behind a node that forwards the relay
// port. Its HTTP server listens on that namespace's 127.0.0.1:9002, which Get
// reaches with DialInNetns.
func StartRelayInNetns(ctx context.Context, bins Binaries, netns, name, logFile string, env ...string) (*Relay, error) {
	const httpAddr = "127.0.0.1:9002"
	p, err := StartProcess(ctx, ProcessConfig{
		Name:    name,
		Path:    bins.Relay,
		LogFile: logFile,
		Netns:   netns,
		Env:     append(append(OffMachineEnv(), "TS_LOCAL_ADDR_PORT="+httpAddr), env...),
	})
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return DialInNetns(ctx, netns, network, addr)
		},
		DisableKeepAlives: true,
	}
	return &Relay{Process: p, HTTPAddr: httpAddr, Netns: netns, client: &http.Client{Transport: tr}}, nil
}

// Get fetches path from the relay's HTTP server.
func (r *Relay) Get(ctx context.Context, path string) (code int, body string, err error) {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+r.HTTPAddr+path, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// WaitReady polls /readyz until it answers 200. It calls answer (if not nil)
// with every answer that differs from the one before, the 200 included. It
// fails at once if the relay exits.
func (r *Relay) WaitReady(ctx context.Context, answer func(code int, body string)) error {
	last := ""
	return WaitFor(ctx, cmp.Or(r.Poll, pollInterval), func() (bool, error) {
		select {
		case <-r.Done():
			return false, fmt.Errorf("%s exited: %v", r.Name(), r.Wait(ctx))
		default:
		}
		code, body, err := r.Get(ctx, "/readyz")
		if err != nil {
			return false, nil // not listening yet
		}
		if s := fmt.Sprint(code, body); s != last && answer != nil {
			answer(code, body)
			last = s
		}
		return code == http.StatusOK, nil
	})
}

// RelayStatus is the relay's verbose /readyz, decoded into the type the
// relay encodes (internal/readyz, whose own test keeps the field names).
type RelayStatus = readyz.Status

// Status fetches and decodes /readyz?verbose.
func (r *Relay) Status(ctx context.Context) (RelayStatus, error) {
	var st RelayStatus
	_, body, err := r.Get(ctx, "/readyz?verbose")
	if err != nil {
		return st, fmt.Errorf("%s status: %w", r.Name(), err)
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		return st, fmt.Errorf("%s status: %w: %s", r.Name(), err, body)
	}
	return st, nil
}

// Metrics fetches /metrics and parses it with Prometheus's own text parser,
// which rejects an invalid exposition (a second HELP or TYPE line for one
// family, say).
func (r *Relay) Metrics(ctx context.Context) (map[string]*dto.MetricFamily, error) {
	code, body, err := r.Get(ctx, "/metrics")
	if err != nil {
		return nil, fmt.Errorf("%s metrics: %w", r.Name(), err)
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("%s metrics: HTTP %d: %s", r.Name(), code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%s metrics: %w", r.Name(), err)
	}
	return fams, nil
}

// MetricSum returns the sum of every sample of family name whose labels
// include labels (name, value pairs), and whether the family exists.
func MetricSum(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
	var sum float64
	for _, m := range f.GetMetric() {
		if !hasLabels(m, labels) {
			continue
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Untyped != nil:
			sum += m.Untyped.GetValue()
		}
	}
	return sum, true
}

func hasLabels(m *dto.Metric, pairs []string) bool {
	for i := 0; i+1 < len(pairs); i += 2 {
		found := false
		for _, l := range m.GetLabel() {
			if l.GetName() == pairs[i] && l.GetValue() == pairs[i+1] {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}
