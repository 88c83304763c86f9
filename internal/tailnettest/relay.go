package tailnettest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"
)

// Relay is the real relay binary (cmd/relay) running as a subprocess,
// configured only through its environment, as in a pod.
type Relay struct {
	*Process
	// HTTPAddr is the relay's TS_LOCAL_ADDR_PORT, on 127.0.0.1.
	HTTPAddr string
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
		Env: append([]string{
			"TS_LOCAL_ADDR_PORT=" + httpAddr,
			"TS_NO_LOGS_NO_SUPPORT=true",
			"TS_DISABLE_PORTMAPPER=1",
			"TS_PANIC_IF_HIT_MAIN_CONTROL=1",
			"TS_ASSUME_NETWORK_UP_FOR_TEST=1",
		}, env...),
	})
	if err != nil {
		return nil, err
	}
	return &Relay{Process: p, HTTPAddr: httpAddr}, nil
}

// Get fetches path from the relay's HTTP server.
func (r *Relay) Get(ctx context.Context, path string) (code int, body string, err error) {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+r.HTTPAddr+path, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := http.DefaultClient.Do(req)
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
	return WaitFor(ctx, 50*time.Millisecond, func() (bool, error) {
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

// RelayStatus is the part of the relay's verbose /readyz that tests and the
// demo read. It is declared here, not taken from package relay, so that a
// change to the JSON users see breaks the tests.
type RelayStatus struct {
	Ready        bool     `json:"ready"`
	Reason       string   `json:"reason"`
	BackendState string   `json:"backendState"`
	TailscaleIPs []string `json:"tailscaleIPs"`
	Relay        struct {
		Port            uint16 `json:"port"`
		Bound           bool   `json:"bound"`
		StaticEndpoints []struct {
			Endpoint string `json:"endpoint"`
			Source   string `json:"source"` // explicit, service or dns
		} `json:"staticEndpoints"`
		Service      string `json:"service"`
		SessionTable []struct {
			VNI     uint32 `json:"vni"`
			Clients [2]struct {
				Endpoint  string `json:"endpoint"`
				PacketsTx uint64 `json:"packetsTx"`
				BytesTx   uint64 `json:"bytesTx"`
			} `json:"clients"`
		} `json:"sessionTable"`
	} `json:"relay"`
}

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
