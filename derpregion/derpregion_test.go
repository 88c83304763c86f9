package derpregion

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"tailscale.com/client/local"
	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/ipn/store"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// stubNode stands in for the relay's tailnet node in the unit tests: a set
// of known node keys and a backend state. The end-to-end test uses a real
// tailscaled instead.
type stubNode struct {
	mu    sync.Mutex
	state ipn.State
	known map[key.NodePublic]bool
}

func (n *stubNode) StatusWithoutPeers(context.Context) (*ipnstate.Status, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return &ipnstate.Status{BackendState: n.state.String()}, nil
}

func (n *stubNode) WhoIsNodeKey(_ context.Context, k key.NodePublic) (*apitype.WhoIsResponse, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.known[k] {
		return nil, local.ErrPeerNotFound
	}
	return &apitype.WhoIsResponse{Node: &tailcfg.Node{Key: k}}, nil
}

func (n *stubNode) setState(s ipn.State) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.state = s
}

// serveForTest starts a Server on loopback with a self-signed certificate
// in a file store under dir, and stops it in t.Cleanup.
func serveForTest(t *testing.T, node Node, dir string) (*Server, *Cert) {
	t.Helper()
	st, err := store.NewFileStore(t.Logf, filepath.Join(dir, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := SelfSigned(st, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	s, err := Listen(ServerConfig{
		DERPAddr: "127.0.0.1:0",
		STUNAddr: "127.0.0.1:0",
		TLS:      cert,
		Node:     node,
		Logger:   slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	waitFor(t, "the server to serve", s.Serving)
	return s, cert
}

// testWriter sends slog output to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// regionFor is the derpMap region a client uses to reach s, pinned to pin.
func regionFor(s *Server, cert *Cert, certName string) *tailcfg.DERPRegion {
	r, err := Region(RegionOptions{
		RegionID: DefaultRegionID, RegionCode: DefaultRegionCode, Cert: cert,
		Addrs:    []netip.Addr{s.DERPAddr().Addr()},
		DERPPort: int(s.DERPAddr().Port()), STUNPort: int(s.STUNAddr().Port()),
	})
	if err != nil {
		panic(err)
	}
	r.Nodes[0].CertName = certName
	return r
}

// connect dials s as Tailscale's DERP client does and reports whether the
// server admitted it (sent its server info) or the error that ended it.
func connect(t *testing.T, r *tailcfg.DERPRegion, priv key.NodePrivate) error {
	t.Helper()
	nm := netmon.NewStatic()
	c := derphttp.NewRegionClient(priv, logger.WithPrefix(t.Logf, "derp client: "), nm, func() *tailcfg.DERPRegion { return r })
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		return err
	}
	// The server sends its info only after admission; a refused client
	// sees the connection close instead.
	type result struct {
		m   derp.ReceivedMessage
		err error
	}
	rc := make(chan result, 1)
	go func() {
		m, err := c.Recv()
		rc <- result{m, err}
	}()
	select {
	case res := <-rc:
		if res.err != nil {
			return res.err
		}
		if _, ok := res.m.(derp.ServerInfoMessage); !ok {
			return errors.New("first message is not the server info")
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func TestAdmission(t *testing.T) {
	member := key.NewNode()
	node := &stubNode{state: ipn.Running, known: map[key.NodePublic]bool{member.Public(): true}}
	s, cert := serveForTest(t, node, t.TempDir())
	r := regionFor(s, cert, cert.CertName())
	refused := func() float64 { return float64(s.refused.Load()) }

	if err := connect(t, r, member); err != nil {
		t.Errorf("tailnet member: connect = %v, want admitted", err)
	}
	if got := refused(); got != 0 {
		t.Errorf("refused after a member = %v, want 0", got)
	}
	if err := connect(t, r, key.NewNode()); err == nil {
		t.Errorf("stranger: admitted, want refused")
	}
	if got := refused(); got != 1 {
		t.Errorf("refused after a stranger = %v, want 1", got)
	}
	for _, st := range []ipn.State{ipn.Starting, ipn.NeedsLogin, ipn.Stopped} {
		node.setState(st)
		if err := connect(t, r, member); err == nil {
			t.Errorf("member while the relay node is %v: admitted, want refused (fail closed)", st)
		}
	}
	node.setState(ipn.Running)
	if err := connect(t, r, member); err != nil {
		t.Errorf("member once Running again: connect = %v, want admitted", err)
	}
}

func TestWrongPinRefused(t *testing.T) {
	member := key.NewNode()
	node := &stubNode{state: ipn.Running, known: map[key.NodePublic]bool{member.Public(): true}}
	s, cert := serveForTest(t, node, t.TempDir())
	accepts := func() float64 { return s.stats.int("accepts") }

	wrong := "sha256-raw:" + strings.Repeat("ab", 32)
	err := connect(t, regionFor(s, cert, wrong), member)
	if err == nil || !strings.Contains(err.Error(), "cert hash does not match") {
		t.Errorf("client pinning another certificate: connect = %v, want a hash mismatch", err)
	}
	if got := accepts(); got != 0 {
		t.Errorf("DERP accepts after a client refused the certificate = %v, want 0", got)
	}
	// The same client with the right pin gets in, so the refusal above
	// was the pin.
	if err := connect(t, regionFor(s, cert, cert.CertName()), member); err != nil {
		t.Errorf("client pinning the right certificate: connect = %v, want admitted", err)
	}
}

func TestSTUNAndMetrics(t *testing.T) {
	member := key.NewNode()
	node := &stubNode{state: ipn.Running, known: map[key.NodePublic]bool{member.Public(): true}}
	s, cert := serveForTest(t, node, t.TempDir())
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(s, nil, DefaultRegionCode, slog.Default()))
	stunBefore := metricValue(t, reg, "tsrelay_derp_stun_requests_total")

	// A real STUN binding request over UDP.
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	tx := stun.NewTxID()
	if _, err := pc.WriteToUDPAddrPort(stun.Request(tx), s.STUNAddr()); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1500)
	n, err := pc.Read(buf)
	if err != nil {
		t.Fatalf("read STUN reply: %v", err)
	}
	gotTx, mapped, err := stun.ParseResponse(buf[:n])
	if err != nil {
		t.Fatalf("parse STUN reply: %v", err)
	}
	if gotTx != tx || mapped != pc.LocalAddr().(*net.UDPAddr).AddrPort() {
		t.Errorf("STUN reply = %v %v, want %v %v", gotTx, mapped, tx, pc.LocalAddr())
	}

	if err := connect(t, regionFor(s, cert, cert.CertName()), member); err != nil {
		t.Fatalf("member: %v", err)
	}
	if err := connect(t, regionFor(s, cert, cert.CertName()), key.NewNode()); err == nil {
		t.Fatalf("stranger admitted")
	}

	for name, want := range map[string]float64{
		"tsrelay_derp_serving":               1,
		"tsrelay_derp_clients_refused_total": 1,
		"tsrelay_derp_accepts_total":         2,
		"tsrelay_derp_stun_requests_total":   stunBefore + 1,
	} {
		if got := metricValue(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if got := metricValue(t, reg, "tsrelay_derp_cert_expiry_timestamp_seconds"); got != float64(cert.NotAfter().Unix()) {
		t.Errorf("cert expiry = %v, want %v", got, cert.NotAfter().Unix())
	}
}

// metricValue gathers reg and sums the series called name over their
// labels.
func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.Metric {
			sum += m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	return sum
}

func TestListenErrors(t *testing.T) {
	if _, err := Listen(ServerConfig{}); err == nil || !strings.Contains(err.Error(), "no DERP address") {
		t.Errorf("Listen(empty config) = %v, want every missing field named", err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	st, err := store.NewFileStore(t.Logf, filepath.Join(t.TempDir(), "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := SelfSigned(st, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	_, err = Listen(ServerConfig{DERPAddr: busy.Addr().String(), STUNAddr: "127.0.0.1:0", TLS: cert, Node: &stubNode{}, Logger: slog.Default()})
	if err == nil || !strings.Contains(err.Error(), "listen for DERP on tcp "+busy.Addr().String()) {
		t.Errorf("Listen on a busy port = %v, want an error naming it", err)
	}
}
