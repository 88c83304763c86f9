package derpregion

import (
	"context"
	"github.com/prometheus/client_golang/prometheus"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/ipn"
	"tailscale.com/ipn/store"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// meshNode is one node of a test region: a Server that can be stopped
// before the test ends.
type meshNode struct {
	s    *Server
	stop func()
}

// addrVar is a peer address filled in once the peer listens.
type addrVar struct {
	mu sync.Mutex
	ap netip.AddrPort
}

func (a *addrVar) set(ap netip.AddrPort) { a.mu.Lock(); a.ap = ap; a.mu.Unlock() }
func (a *addrVar) get() (netip.AddrPort, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ap, a.ap.IsValid()
}

// startMeshNode starts a Server on loopback with cert, mesh key mk and
// peers, stopped by the returned stop (also in t.Cleanup).
func startMeshNode(t *testing.T, name string, node Node, cert *Cert, mk key.DERPMesh, peers []MeshPeer) *meshNode {
	t.Helper()
	s, err := Listen(ServerConfig{
		DERPAddr: "127.0.0.1:0", STUNAddr: "127.0.0.1:0",
		TLS: cert, Node: node, MeshKey: mk, MeshPeers: peers,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", name),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Serve %s: %v", name, err)
			}
		})
	}
	t.Cleanup(stop)
	waitFor(t, name+" to serve", s.Serving)
	return &meshNode{s: s, stop: stop}
}

// testCert makes a self-signed certificate in a fresh file store.
func testCert(t *testing.T) *Cert {
	t.Helper()
	st, err := store.NewFileStore(t.Logf, filepath.Join(t.TempDir(), "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := SelfSigned(st, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// testClient is a tailnet node's DERP client with its received packets.
type testClient struct {
	priv key.NodePrivate
	c    *derphttp.Client
	pkts chan derp.ReceivedPacket
}

// dialClient connects priv to s as a Tailscale client does and receives
// in the background until the test ends.
func dialClient(t *testing.T, s *Server, cert *Cert, priv key.NodePrivate) *testClient {
	t.Helper()
	r := regionFor(s, cert, cert.CertName())
	c := derphttp.NewRegionClient(priv, logger.WithPrefix(t.Logf, "client: "), netmon.NewStatic(), func() *tailcfg.DERPRegion { return r })
	tc := &testClient{priv: priv, c: c, pkts: make(chan derp.ReceivedPacket, 64)}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("client connect: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := c.Recv()
			if err != nil {
				if c.Close() == derphttp.ErrClientClosed {
					return
				}
				continue
			}
			if p, ok := m.(derp.ReceivedPacket); ok {
				p.Data = append([]byte(nil), p.Data...)
				tc.pkts <- p
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return tc
}

// close disconnects the client.
func (tc *testClient) close() { tc.c.Close() }

// exchange sends from one client to another until one packet arrives
// (the route through the mesh appears once the peer's watch has seen the
// receiver), or fails after 10 s.
func exchange(t *testing.T, from, to *testClient, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	msg := []byte("hello " + what)
	for time.Now().Before(deadline) {
		if err := from.c.Send(to.priv.Public(), msg); err != nil {
			t.Fatalf("%s: send: %v", what, err)
		}
		select {
		case p := <-to.pkts:
			if p.Source != from.priv.Public() || string(p.Data) != string(msg) {
				t.Fatalf("%s: got %q from %v, want %q from %v", what, p.Data, p.Source.ShortString(), msg, from.priv.Public().ShortString())
			}
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	t.Fatalf("%s: no packet arrived in 10 s", what)
}

// waitMesh waits until every mesh link of s reports connected == want.
func waitMesh(t *testing.T, s *Server, want bool) {
	t.Helper()
	waitFor(t, "mesh links", func() bool {
		for _, st := range s.MeshPeers() {
			if st.Connected != want {
				return false
			}
		}
		return len(s.MeshPeers()) > 0
	})
}

func TestMeshForwardsAndSurvivesANode(t *testing.T) {
	ca, cb, cc := key.NewNode(), key.NewNode(), key.NewNode()
	node := &stubNode{state: ipn.Running, known: map[key.NodePublic]bool{ca.Public(): true, cb.Public(): true, cc.Public(): true}}
	cert := testCert(t)
	mk, err := NewMeshKey()
	if err != nil {
		t.Fatal(err)
	}
	var addrA, addrB addrVar
	a := startMeshNode(t, "a", node, cert, mk, []MeshPeer{{Name: "b", Addr: addrB.get}})
	addrA.set(a.s.DERPAddr())
	b := startMeshNode(t, "b", node, cert, mk, []MeshPeer{{Name: "a", Addr: addrA.get}})
	addrB.set(b.s.DERPAddr())
	waitMesh(t, a.s, true)
	waitMesh(t, b.s, true)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(b.s, nil, DefaultRegionCode, slog.Default()))
	if got := metricValue(t, reg, "tsrelay_derp_mesh_peer_connected"); got != 1 {
		t.Errorf("b's tsrelay_derp_mesh_peer_connected = %v, want 1", got)
	}
	if st := a.s.MeshPeers()[0]; st.Name != "b" || st.Addr != b.s.DERPAddr().String() || st.Error != "" {
		t.Errorf("a's mesh status = %+v, want b at %v, connected, no error", st, b.s.DERPAddr())
	}

	onA := dialClient(t, a.s, cert, ca)
	onB := dialClient(t, b.s, cert, cb)
	exchange(t, onA, onB, "A to B")
	exchange(t, onB, onA, "B to A")

	// Node A goes away (a pod restart): B keeps serving, notices, and a
	// client of A reconnecting to B reaches B's client again.
	a.stop()
	onA.close()
	waitMesh(t, b.s, false)
	if got := metricValue(t, reg, "tsrelay_derp_mesh_peer_connected"); got != 0 {
		t.Errorf("b's tsrelay_derp_mesh_peer_connected after a stopped = %v, want 0", got)
	}
	if st := b.s.MeshPeers()[0]; st.Error == "" {
		t.Errorf("b's link to the stopped a = %+v, want an error", st)
	}
	other := dialClient(t, b.s, cert, cc)
	exchange(t, other, onB, "on B after A stopped")
	back := dialClient(t, b.s, cert, ca)
	exchange(t, back, onB, "reconnected to B, to B's client")
	exchange(t, onB, back, "B's client to the reconnected one")
}

// connectMesh dials s as a mesh peer would, with node key priv and mesh
// key mk, and reports whether s admitted it.
func connectMesh(t *testing.T, s *Server, cert *Cert, priv key.NodePrivate, mk key.DERPMesh) error {
	t.Helper()
	r := regionFor(s, cert, cert.CertName())
	c := derphttp.NewRegionClient(priv, logger.WithPrefix(t.Logf, "mesh client: "), netmon.NewStatic(), func() *tailcfg.DERPRegion { return r })
	c.MeshKey = mk
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		return err
	}
	// Pongs are handled by whoever receives; a refused client's
	// connection closes and the ping fails.
	go func() {
		for {
			if _, err := c.Recv(); err != nil {
				return
			}
		}
	}()
	return c.Ping(ctx)
}

func TestMeshKeyAdmission(t *testing.T) {
	node := &stubNode{state: ipn.Running, known: map[key.NodePublic]bool{}}
	cert := testCert(t)
	mk, _ := NewMeshKey()
	wrong, _ := NewMeshKey()
	n := startMeshNode(t, "n", node, cert, mk, nil)
	stranger := key.NewNode() // not a tailnet node: only the mesh key admits it
	if err := connectMesh(t, n.s, cert, stranger, mk); err != nil {
		t.Errorf("mesh peer with the region's key: %v, want admitted", err)
	}
	if err := connectMesh(t, n.s, cert, stranger, wrong); err == nil {
		t.Errorf("client with a wrong mesh key: admitted, want refused")
	}
	if got := n.s.refused.Load(); got != 1 {
		t.Errorf("refused = %d, want 1 (the wrong key fell through to the tailnet check)", got)
	}

	// A node of another region (same mesh key, different certificate)
	// is refused by the pin, and says so.
	var addrN addrVar
	addrN.set(n.s.DERPAddr())
	other := startMeshNode(t, "other", node, testCert(t), mk, []MeshPeer{{Name: "n", Addr: addrN.get}})
	waitFor(t, "the pin to refuse", func() bool {
		st := other.s.MeshPeers()[0]
		return !st.Connected && strings.Contains(st.Error, "cert hash does not match")
	})
}
