package derpregion

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
)

// meshPingInterval is how often a mesh link checks that its peer answers.
// The link's state (connected or not) is what the last ping found, so it
// is at most this old; a ping that gets no pong within meshPingTimeout
// counts as a broken link.
const (
	meshPingInterval = 2 * time.Second
	meshPingTimeout  = 3 * time.Second
)

// MeshPeer is another node of the region, which this server meshes with so
// that a client connected to either reaches clients connected to the
// other.
type MeshPeer struct {
	// Name identifies the peer in logs, /readyz and metrics (a Service
	// name, or ip:port).
	Name string
	// Addr returns where to dial the peer's DERP server now, and false
	// while it is not known (a Service not yet seen). It is called before
	// each connection attempt.
	Addr func() (netip.AddrPort, bool)
}

// MeshPeerStatus is the state of the link to one mesh peer.
type MeshPeerStatus struct {
	Name string `json:"name"`
	// Addr is the address dialled last; empty while none is known.
	Addr      string `json:"addr,omitempty"`
	Connected bool   `json:"connected"`
	// Since is when Connected last changed (when the link started, if it
	// never did).
	Since time.Time `json:"since"`
	// Error is the last connection error while not connected.
	Error string `json:"error,omitempty"`
}

// meshLink is this server's mesh client to one peer: a DERP client with
// the server's own private key and the region's mesh key, which watches
// the peer's clients and registers it as their packet forwarder here
// (what cmd/derper's mesh.go does).
type meshLink struct {
	s    *Server
	peer MeshPeer
	log  *slog.Logger

	mu        sync.Mutex
	addr      netip.AddrPort
	connected bool
	since     time.Time
	lastErr   string
}

// region is the one-node region the mesh client dials: the peer's address
// right now, with the region's certificate pinned exactly as Tailscale
// clients pin it (CertName "sha256-raw:…", checked by tlsdial with the
// HostName as the TLS server name). Nil while no address is known, which
// derphttp reports as a connect error and retries.
func (l *meshLink) region() *tailcfg.DERPRegion {
	ap, ok := l.peer.Addr()
	if !ok || !ap.IsValid() {
		return nil
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	l.mu.Lock()
	l.addr = ap
	l.mu.Unlock()
	cert := l.s.cfg.TLS
	n := &tailcfg.DERPNode{
		Name:     "mesh-" + l.peer.Name,
		HostName: cert.HostName,
		CertName: cert.CertName(),
		IPv4:     "none",
		IPv6:     "none",
		DERPPort: int(ap.Port()),
		STUNPort: -1,
	}
	if ap.Addr().Is4() {
		n.IPv4 = ap.Addr().String()
	} else {
		n.IPv6 = ap.Addr().String()
	}
	return &tailcfg.DERPRegion{RegionID: 1, RegionCode: "mesh", Nodes: []*tailcfg.DERPNode{n}}
}

// run keeps the link up until ctx is done. derphttp's watch loop
// reconnects by itself (every 5 s after a failure, derphttp.retryInterval
// at v1.102.5); run pings the peer to know whether the link works.
func (l *meshLink) run(ctx context.Context) {
	l.setState(false, "not connected yet")
	logf := func(format string, args ...any) {
		l.log.Debug(fmt.Sprintf(format, args...))
	}
	c := derphttp.NewRegionClient(l.s.derp.PrivateKey(), logf, netmon.NewStatic(), l.region)
	c.MeshKey = l.s.derp.MeshKey()
	c.WatchConnectionChanges = true
	// The mesh link's dials are bound by ctx too, so that Serve returns.
	c.BaseContext = func() context.Context { return ctx }

	var errMu sync.Mutex
	var connErr string
	add := func(m derp.PeerPresentMessage) { l.s.derp.AddPacketForwarder(m.Key, c) }
	remove := func(m derp.PeerGoneMessage) { l.s.derp.RemovePacketForwarder(m.Peer, c) }
	notifyError := func(err error) {
		errMu.Lock()
		connErr = err.Error()
		errMu.Unlock()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.RunWatchConnectionLoop(ctx, l.s.derp.PublicKey(), logf, add, remove, notifyError)
		if ctx.Err() == nil {
			// It returns early only when the peer is this server.
			l.log.Warn("DERP mesh peer is this server itself; check TS_DERP_MESH_PEERS")
			notifyError(fmt.Errorf("peer %s is this server", l.peer.Name))
		}
	}()

	t := time.NewTicker(meshPingInterval)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, meshPingTimeout)
		err := c.Ping(pctx)
		cancel()
		if ctx.Err() != nil {
			break
		}
		if err == nil {
			l.setState(true, "")
		} else {
			errMu.Lock()
			why := connErr
			errMu.Unlock()
			if why == "" {
				why = err.Error()
			}
			l.setState(false, why)
		}
		select {
		case <-ctx.Done():
		case <-t.C:
			continue
		}
		break
	}
	c.Close()
	<-done
}

// setState records the link's state and logs a change.
func (l *meshLink) setState(connected bool, why string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	changed := connected != l.connected || l.since.IsZero()
	l.lastErr = why
	if !changed {
		return
	}
	l.connected = connected
	l.since = time.Now()
	switch {
	case connected:
		l.log.Info("DERP mesh peer connected", "addr", l.addr.String())
	case why != "not connected yet":
		l.log.Warn("DERP mesh peer not connected; retrying", "addr", l.addr.String(), "err", why)
	}
}

// status returns the link's state.
func (l *meshLink) status() MeshPeerStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := MeshPeerStatus{Name: l.peer.Name, Connected: l.connected, Since: l.since}
	if l.addr.IsValid() {
		st.Addr = l.addr.String()
	}
	if !l.connected {
		st.Error = l.lastErr
	}
	return st
}

// MeshPeers returns the state of the links to the region's other nodes, in
// ServerConfig.MeshPeers order; nil without a mesh.
func (s *Server) MeshPeers() []MeshPeerStatus {
	var out []MeshPeerStatus
	for _, l := range s.mesh {
		out = append(out, l.status())
	}
	return out
}
