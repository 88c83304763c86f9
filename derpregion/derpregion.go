// Package derpregion serves a DERP region from the relay: DERP over TLS on
// a TCP port and STUN on a UDP port, with Tailscale's own derp/derpserver
// and a STUN server (stun.go, net/stunserver's but for one fix). A region has one node, or several meshed with
// Tailscale's DERP mesh (ServerConfig.MeshKey, ServerConfig.MeshPeers): each node
// dials the others with the region's shared mesh key, watches their
// clients and forwards packets to them, so a client of one node reaches
// clients of another, and the region stays up while one node restarts.
//
// A node sends its first packets to a peer through the peer's home DERP
// region, and picks as home the region with the lowest latency its netcheck
// measures. A region served on the relay's load-balancer address is home to
// the cluster's own tailnet nodes and to laptops on the same network, so
// their first packets stay on the LAN. The guarantee and its limit:
//
//   - Only members of the relay's tailnet may use the DERP server: every
//     client's node key is looked up in the relay's own tailnet node
//     ([Node.WhoIsNodeKey]); unknown keys are refused, and every client is
//     refused while that node is not Running (fail closed). The one
//     exception is a mesh peer presenting the region's mesh key, which
//     derpserver trusts without the check; there is no open mode.
//   - Strangers reach the DERP port before that check, so what they can
//     make it hold is bounded first (guard.go): small request headers,
//     timeouts on every phase before admission, a cap on connections not
//     yet admitted (in all and per source address) and an accept rate.
//     Admitted clients are outside those limits.
//   - A node homed here is reachable over DERP only by nodes that can reach
//     this address. A private address suits a LAN-only tailnet; a laptop
//     away from home loses the DERP path to every node homed here.
//
// TLS needs no domain: [SelfSigned] creates a certificate once and keeps it
// in a [Store] so that its fingerprint, and the derpMap pasted into the
// tailnet policy, survive restarts; [FromFiles] serves a certificate the
// user provides (a mounted kubernetes.io/tls Secret). [Region] builds the
// derpMap entry for either.
//
// The relay runs the region as one component, as a CoreDNS plugin runs:
// [Config] is its settings (embedded in the relay's, checked by
// [Config.Validate]), and [Setup] builds the running [Instance] from them
// and a few seams ([Deps]: the relay's own settings, its tailnet node, its
// advertised endpoints, Events, the Kubernetes client and state store).
// The relay runs [Instance.Run] in its errgroup, serves [Instance] at
// /derpmap and folds [Instance.Status] into /readyz.
package derpregion

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"tailscale.com/client/local"
	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/derp/derpserver"
	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// Node is the relay's own tailnet node, which decides who may use the DERP
// server. tsnet.Server.LocalClient() (a *local.Client) satisfies it.
type Node interface {
	// StatusWithoutPeers reports the node's backend state; admission
	// requires Running.
	StatusWithoutPeers(ctx context.Context) (*ipnstate.Status, error)
	// WhoIsNodeKey returns the tailnet node that owns a node key, or
	// local.ErrPeerNotFound.
	WhoIsNodeKey(ctx context.Context, k key.NodePublic) (*apitype.WhoIsResponse, error)
}

// admitTimeout bounds one admission check; derpserver gives the whole
// admission request 5 s.
const admitTimeout = 3 * time.Second

// shutdownTimeout is how long Serve lets the TLS server close its listeners
// once ctx is done. DERP connections are hijacked, so Shutdown does not wait
// for them; derpserver.Server.Close closes them.
const shutdownTimeout = 5 * time.Second

// Limits of the DERP port's HTTP server; see also guard.go.
const (
	derpMaxHeaderBytes    = 4 << 10
	derpReadHeaderTimeout = 5 * time.Second
	derpIdleTimeout       = 5 * time.Second
)

// limits are the DERP port's timeouts, in a struct so that tests can
// shorten them.
type limits struct {
	readHeader  time.Duration // http.Server.ReadHeaderTimeout, and the TLS handshake's
	idle        time.Duration // http.Server.IdleTimeout
	admitWithin time.Duration // see guard.go
	logInterval time.Duration // refusals.logEvery
}

func defaultLimits() limits {
	return limits{
		readHeader:  derpReadHeaderTimeout,
		idle:        derpIdleTimeout,
		admitWithin: admitWithin,
		logInterval: refusalLogInterval,
	}
}

// ServerConfig says where the DERP and STUN servers listen and who may use them.
type ServerConfig struct {
	// DERPAddr is the TCP address for DERP over TLS, e.g. ":8443".
	DERPAddr string
	// STUNAddr is the UDP address for STUN, e.g. ":3478".
	STUNAddr string
	// TLS is the server's certificate: from SelfSigned or FromFiles.
	TLS *Cert
	// Node admits clients: only its tailnet's node keys may connect.
	Node Node
	// Logger receives one line per state change, and one per
	// refusalLogInterval with the connections refused in it.
	Logger *slog.Logger

	// MaxUnadmitted caps the DERP connections not yet admitted (see
	// guard.go); zero means DefaultMaxUnadmitted.
	MaxUnadmitted int
	// AcceptRate is how many new DERP connections a second are accepted,
	// with a burst of AcceptBurstSeconds of it; zero means
	// DefaultAcceptRate.
	AcceptRate float64

	// MeshKey, when set, is the region's shared mesh key: a client that
	// presents it is another node of the region (a mesh peer), trusted
	// without the tailnet admission check and allowed to watch this
	// server's clients. Zero: no mesh.
	MeshKey key.DERPMesh
	// MeshPeers are the region's other nodes, each dialled with MeshKey
	// and TLS pinned to TLS's certificate, which every node of the region
	// shares. Needs MeshKey.
	MeshPeers []MeshPeer
}

func (c ServerConfig) validate() error {
	var errs []error
	if c.DERPAddr == "" {
		errs = append(errs, errors.New("derpregion: no DERP address"))
	}
	if c.STUNAddr == "" {
		errs = append(errs, errors.New("derpregion: no STUN address"))
	}
	if c.TLS == nil {
		errs = append(errs, errors.New("derpregion: no TLS certificate"))
	}
	if c.Node == nil {
		errs = append(errs, errors.New("derpregion: no tailnet node to admit clients"))
	}
	if c.Logger == nil {
		errs = append(errs, errors.New("derpregion: no logger"))
	}
	if c.MaxUnadmitted < 0 {
		errs = append(errs, fmt.Errorf("derpregion: MaxUnadmitted %d is negative", c.MaxUnadmitted))
	}
	if c.AcceptRate < 0 {
		errs = append(errs, fmt.Errorf("derpregion: AcceptRate %v is negative", c.AcceptRate))
	}
	if len(c.MeshPeers) > 0 && c.MeshKey.IsZero() {
		errs = append(errs, errors.New("derpregion: mesh peers need a mesh key"))
	}
	for i, p := range c.MeshPeers {
		if p.Name == "" || p.Addr == nil {
			errs = append(errs, fmt.Errorf("derpregion: mesh peer %d has no name or no address func", i))
		}
	}
	return errors.Join(errs...)
}

// Server is a DERP server and a STUN server, bound by Listen and serving
// from Serve until its context ends.
type Server struct {
	cfg    ServerConfig
	logger *slog.Logger
	derp   *derpserver.Server
	stats  *derpStats

	derpLn  *guardListener // the limits of guard.go
	admitLn net.Listener
	token   string // in the admission URL's path
	stun    *stunServer
	mesh    []*meshLink // one per ServerConfig.MeshPeers

	// refused counts clients the admission check turned away;
	// refusals, every connection refused or closed before admission.
	refused  atomic.Uint64
	refusals refusals
	// lim are the port's timeouts; tests shorten them.
	lim       limits
	serving   atomic.Bool
	closeOnce sync.Once
}

// Listen binds the DERP (TCP), STUN (UDP) and in-process admission
// (loopback TCP) sockets, so that a port in use is an error before anything
// serves. Call Serve next, or Close to release the sockets.
func Listen(cfg ServerConfig) (_ *Server, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, logger: cfg.Logger, lim: defaultLimits()}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	ln, err := net.Listen("tcp", cfg.DERPAddr)
	if err != nil {
		return nil, fmt.Errorf("derpregion: listen for DERP on tcp %s: %w", cfg.DERPAddr, err)
	}
	s.derpLn = newGuardListener(ln, cmp.Or(cfg.MaxUnadmitted, DefaultMaxUnadmitted), cmp.Or(cfg.AcceptRate, DefaultAcceptRate), &s.refusals, &s.lim)
	if s.stun, err = listenSTUN(cfg.STUNAddr); err != nil {
		return nil, fmt.Errorf("derpregion: listen for STUN on udp %s: %w", cfg.STUNAddr, err)
	}
	if s.stun.filterErr != nil {
		s.logger.Warn("STUN serves unfiltered: junk sent to it costs more CPU", "err", s.stun.filterErr)
	}
	// derpserver asks an admission URL with http.DefaultClient; nothing
	// more direct exists at v1.102.5 (SetVerifyClient needs a tailscaled
	// unix socket, which tsnet does not have). Loopback only, and the path
	// holds a random token, so other processes in the pod cannot use it as
	// an oracle for node keys.
	s.admitLn, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("derpregion: listen for admission checks on loopback: %w", err)
	}
	s.token = rand.Text()
	// A new DERP key each start: clients learn it from the server, the
	// derpMap does not name it.
	s.derp = derpserver.New(key.NewNode(), func(format string, args ...any) {
		s.logger.Debug(fmt.Sprintf(format, args...), "component", "derp")
	})
	s.derp.SetVerifyClientURL("http://" + s.admitLn.Addr().String() + "/admit/" + s.token)
	s.derp.SetVerifyClientURLFailOpen(false)
	if !cfg.MeshKey.IsZero() {
		// derpserver trusts a client presenting this key as a mesh peer
		// and skips the admission URL for it (isMeshPeer and verifyClient
		// in derp/derpserver at v1.102.5): the peers are not tailnet
		// nodes. Any other client still needs the admission check.
		if err := s.derp.SetMeshKey(cfg.MeshKey.String()); err != nil {
			return nil, errors.New("derpregion: set the mesh key: invalid key")
		}
	}
	for _, p := range cfg.MeshPeers {
		s.mesh = append(s.mesh, &meshLink{s: s, peer: p, log: s.logger.With("mesh_peer", p.Name)})
	}
	s.stats = newDERPStats(s.derp)
	return s, nil
}

// DERPAddr is the address the DERP server listens on.
func (s *Server) DERPAddr() netip.AddrPort { return s.derpLn.Addr().(*net.TCPAddr).AddrPort() }

// STUNAddr is the address the STUN server listens on.
func (s *Server) STUNAddr() netip.AddrPort { return s.stun.localAddr() }

func (s *Server) derpStats() *derpStats { return s.stats }

// Serving reports whether both the DERP and the STUN server are serving.
func (s *Server) Serving() bool { return s.serving.Load() }

// Close releases the sockets. Serve calls it when it returns.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		s.serving.Store(false)
		if s.derpLn != nil {
			s.derpLn.Close()
		}
		if s.admitLn != nil {
			s.admitLn.Close()
		}
		if s.stun != nil {
			s.stun.close()
		}
		if s.derp != nil {
			s.derp.Close()
		}
	})
}

// Serve serves DERP, STUN and the admission checks until ctx is done or one
// of them fails, then closes everything. It returns nil after a clean stop.
func (s *Server) Serve(ctx context.Context) error {
	defer s.Close()
	g, ctx := errgroup.WithContext(ctx)

	admitMux := http.NewServeMux()
	admitMux.HandleFunc("POST /admit/"+s.token, s.serveAdmit)
	admitSrv := &http.Server{Handler: admitMux, ReadHeaderTimeout: admitTimeout}
	g.Go(func() error { return serveUntil(ctx, admitSrv, s.admitLn, "admission", nil) })

	derpMux := http.NewServeMux()
	derpMux.Handle("/derp", markingUpgrades(derpserver.Handler(s.derp)))
	// netcheck's HTTPS latency fallback and captive portal checks.
	derpMux.HandleFunc("/derp/probe", derpserver.ProbeHandler)
	derpMux.HandleFunc("/derp/latency-check", derpserver.ProbeHandler)
	derpMux.HandleFunc("/generate_204", derpserver.ServeNoContent)
	derpSrv := &http.Server{
		Handler: derpMux,
		// Real requests here are a DERP client's upgrade and netcheck's
		// probes: a few hundred bytes of header, sent at once.
		MaxHeaderBytes: derpMaxHeaderBytes,
		// net/http also bounds the TLS handshake by its smallest timeout
		// (http.Server.tlsHandshakeTimeout), so this is the
		// handshake's deadline too.
		ReadHeaderTimeout: s.lim.readHeader,
		// For the plain paths (/generate_204, /derp/probe): a keep-alive
		// connection closes soon after its last request, and admitWithin
		// closes it anyway. An upgraded DERP connection is hijacked, and
		// net/http's timeouts no longer apply to it.
		IdleTimeout: s.lim.idle,
		ConnContext: withGuardConn,
		TLSConfig:   s.cfg.TLS.serverConfig(),
		// DERP upgrades an HTTP/1.1 connection; HTTP/2 would break it.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog:     slog.NewLogLogger(s.logger.Handler(), slog.LevelDebug),
	}
	tlsLn := tls.NewListener(s.derpLn, derpSrv.TLSConfig)
	g.Go(func() error { return serveUntil(ctx, derpSrv, tlsLn, "DERP", s.derp) })

	g.Go(func() error {
		<-ctx.Done()
		s.stun.close() // ends stun.serve
		return nil
	})
	g.Go(func() error {
		if err := s.stun.serve(); err != nil {
			return fmt.Errorf("derpregion: serve STUN: %w", err)
		}
		return nil
	})

	for _, l := range s.mesh {
		g.Go(func() error { l.run(ctx); return nil })
	}
	g.Go(func() error { s.refusals.logEvery(ctx, s.lim.logInterval, s.logger); return nil })

	s.serving.Store(true)
	s.logger.Info("DERP region serving", "derp", s.DERPAddr().String(), "stun", s.STUNAddr().String())
	err := g.Wait()
	s.serving.Store(false)
	s.logger.Info("DERP region stopped")
	return err
}

// serveUntil serves srv on ln until ctx is done, then shuts it down with a
// fresh timeout (ctx is already cancelled, so it cannot bound the drain).
func serveUntil(ctx context.Context, srv *http.Server, ln net.Listener, what string, d *derpserver.Server) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("derpregion: serve %s: %w", what, err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if d != nil {
		d.Close() // the hijacked DERP connections
	}
	<-errc
	if err != nil {
		return fmt.Errorf("derpregion: shut down %s: %w", what, err)
	}
	return nil
}

// serveAdmit answers derpserver's admission request: allow only node keys
// the relay's tailnet node knows, and only while it is Running.
func (s *Server) serveAdmit(w http.ResponseWriter, r *http.Request) {
	var req tailcfg.DERPAdmitClientRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 4<<10)).Decode(&req); err != nil {
		http.Error(w, "bad admission request", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), admitTimeout)
	defer cancel()
	allow, reason := s.admit(ctx, req.NodePublic)
	if !allow {
		s.refused.Add(1)
		s.refusals.add(reasonNotMember)
		// At Debug: strangers can send any number of these; the Info
		// line is refusals.logEvery's count.
		s.logger.Debug("DERP client refused", "node_key", req.NodePublic.ShortString(), "from", req.Source.String(), "reason", reason)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow})
}

// admit decides one client; reason says why not.
func (s *Server) admit(ctx context.Context, k key.NodePublic) (allow bool, reason string) {
	st, err := s.cfg.Node.StatusWithoutPeers(ctx)
	if err != nil {
		return false, fmt.Sprintf("cannot read the relay node's state: %v", err)
	}
	if st.BackendState != ipn.Running.String() {
		return false, "the relay node is " + st.BackendState + ", not Running"
	}
	if _, err := s.cfg.Node.WhoIsNodeKey(ctx, k); err != nil {
		if errors.Is(err, local.ErrPeerNotFound) {
			return false, "node key not in the tailnet"
		}
		return false, fmt.Sprintf("look up node key: %v", err)
	}
	return true, ""
}
