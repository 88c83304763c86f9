package derpregion

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"reflect"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"tailscale.com/ipn"
	"tailscale.com/ipn/store"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/readyz"
)

// Tailnet is the relay's own tailnet node as the region asks it: who may
// use the DERP server (Node), which peers call the region home
// (StatusSource), and which certificate the tailnet's derpMap pins. Before
// the node has started, every method returns an error (every client is
// then refused). tsnet.Server.LocalClient() (a *local.Client) satisfies it.
type Tailnet interface {
	Node
	StatusSource
	// CurrentDERPMap returns the derpMap the node has from the tailnet.
	CurrentDERPMap(ctx context.Context) (*tailcfg.DERPMap, error)
}

// Events records what the user must act on as Kubernetes Events
// (*kubeevents.Recorder); nil records none.
type Events interface {
	Normal(reason, message string)
	Warning(reason, message string)
}

// Deps are the seams through which the region reaches the relay that runs
// it.
type Deps struct {
	// Host is the relay's own settings the region's depend on.
	Host Host
	// Tailnet admits DERP clients and reports the tailnet's derpMap.
	Tailnet Tailnet
	// Endpoints returns the relay's advertised endpoints now, whose IPs
	// clients dial when TS_DERP_ADDRS is empty; EndpointsChanged is poked
	// when they change.
	Endpoints        func() []netip.AddrPort
	EndpointsChanged <-chan struct{}
	// Events, Kube and State may be nil: no Events; no Kubernetes client
	// (TS_DERP_MESH_SECRET then fails); the self-signed certificate kept
	// in CertStateFile in StateDir rather than in the node's state
	// Secret.
	Events   Events
	Kube     *kubeclient.Client
	State    ipn.StateStore
	StateDir string
	// Logger is required.
	Logger *slog.Logger
}

// CertStateFile holds the self-signed certificate in Deps.StateDir when the
// node state is not in a Secret. Not tsnet's own state file: two file
// stores on one file would overwrite each other's keys.
const CertStateFile = "tsrelay-derp.json"

// pinCheckInterval is how often the region compares the certificate it
// serves with the pin in the tailnet's derpMap: the first look comes this
// long after start, when the node has its netmap.
const pinCheckInterval = 5 * time.Second

// Instance is the running DERP region: the servers, the certificate and
// the derpMap for the addresses currently known. A nil *Instance is a
// relay without one: its methods do nothing and report nothing.
type Instance struct {
	cfg     Config
	srv     *Server
	cert    *Cert
	tailnet Tailnet
	events  Events
	logger  *slog.Logger
	// mesh is the region's members when TS_DERP_MESH_PEERS is set.
	mesh *meshPlan
	// svcs follows the members' Services (Service-name members), or nil.
	svcs             *meshServices
	endpoints        func() []netip.AddrPort
	endpointsChanged <-chan struct{}

	mu     sync.Mutex
	region *tailcfg.DERPRegion // nil until an address is known
	why    string              // why region is nil
	// tailnetPin is the CertName the tailnet's derpMap pins for the
	// region when it is not the served certificate's, else "".
	tailnetPin string
}

// Setup returns the DERP region cfg asks for, or nil when it asks for
// none. It checks cfg against deps.Host (as Validate does), loads or
// creates the certificate (with a mesh: the region's shared state), and
// binds the DERP and STUN sockets, so that a port in use fails the start.
// Serve it with Run.
func Setup(ctx context.Context, cfg Config, deps Deps) (*Instance, error) {
	if !cfg.Enabled() {
		return nil, nil
	}
	mesh, err := cfg.check(deps.Host)
	if err != nil {
		return nil, err
	}
	var cert *Cert
	var meshKey key.DERPMesh
	var meshPeers []MeshPeer
	var svcs *meshServices
	switch {
	case mesh != nil:
		shared, err := cfg.loadMeshShared(ctx, deps.Kube, time.Now())
		if err != nil {
			return nil, err
		}
		cert, meshKey = shared.Cert, shared.MeshKey
		svcs = newMeshServices(mesh, deps.Kube, deps.Logger)
		meshPeers = mesh.peers(svcs)
	case cfg.CertFile != "":
		if cert, err = FromFiles(cfg.CertFile, cfg.KeyFile, cfg.HostName); err != nil {
			return nil, err
		}
	default:
		st := Store(deps.State)
		if deps.State == nil {
			if st, err = store.NewFileStore(func(string, ...any) {}, filepath.Join(deps.StateDir, CertStateFile)); err != nil {
				return nil, fmt.Errorf("open the DERP certificate store in TS_STATE_DIR=%s: %w", deps.StateDir, err)
			}
		}
		if cert, err = SelfSigned(st, time.Now()); err != nil {
			return nil, err
		}
	}
	srv, err := Listen(ServerConfig{
		DERPAddr:  net.JoinHostPort("", strconv.Itoa(int(cfg.DERPPort))),
		STUNAddr:  net.JoinHostPort("", strconv.Itoa(int(cfg.STUNPort))),
		TLS:       cert,
		Node:      deps.Tailnet,
		Logger:    deps.Logger.With("src", "derp"),
		MeshKey:   meshKey,
		MeshPeers: meshPeers,

		MaxUnadmitted: cfg.MaxUnadmitted,
		AcceptRate:    cfg.AcceptRate,
	})
	if err != nil {
		return nil, fmt.Errorf("DERP region (TS_DERP_PORT=%d, TS_STUN_PORT=%d): %w", cfg.DERPPort, cfg.STUNPort, err)
	}
	if cert.Created() {
		deps.Logger.Info("created a self-signed DERP certificate; add the region to the tailnet policy's derpMap", "fingerprint", cert.Fingerprint())
	}
	if mesh != nil {
		// Never the key itself: only which member this relay is.
		deps.Logger.Info("DERP mesh", "self", mesh.members[mesh.self].name, "members", len(mesh.members), "sharedState", cfg.meshLocation())
	}
	r := &Instance{
		cfg: cfg, srv: srv, cert: cert, tailnet: deps.Tailnet, events: deps.Events, logger: deps.Logger,
		mesh: mesh, svcs: svcs, endpoints: deps.Endpoints, endpointsChanged: deps.EndpointsChanged,
	}
	r.update()
	return r, nil
}

// Run serves the region until ctx is done, refreshing the derpMap as soon
// as the advertised endpoints or the members' Services change.
func (r *Instance) Run(ctx context.Context) error {
	if r == nil {
		return nil
	}
	errc := make(chan error, 1)
	go func() { errc <- r.srv.Serve(ctx) }()
	var svcsChanged <-chan struct{} // nil without Service members: never ready
	if r.svcs != nil {
		svcsChanged = r.svcs.changed
		sctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); r.svcs.run(sctx) }()
		defer func() { cancel(); <-done }()
	}
	pin := time.NewTicker(pinCheckInterval)
	defer pin.Stop()
	for {
		select {
		case err := <-errc:
			return err
		case <-pin.C:
			r.checkPin(ctx)
		case <-r.endpointsChanged:
			r.update()
		case <-svcsChanged:
			if r.svcs.refresh() {
				r.update()
			}
		}
	}
}

// dialIPs are the IPs clients dial for this relay now.
func (r *Instance) dialIPs() []netip.Addr {
	var eps []netip.AddrPort
	if r.endpoints != nil {
		eps = r.endpoints()
	}
	return r.cfg.dialIPs(eps)
}

// update recomputes the derpMap and, when it changed, logs it once and
// records an Event: the user must paste it into the policy again.
func (r *Instance) update() {
	c := r.cfg
	dial := r.dialIPs()
	region, err := Region(RegionOptions{
		RegionID: c.RegionID, RegionCode: c.RegionCode, Cert: r.cert,
		Addrs:    dial,
		DERPPort: int(c.DERPPort), STUNPort: int(c.STUNPort),
		Members: r.mesh.regionMembers(c.Addrs, dial, r.svcs),
	})
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.region, r.why = nil, err.Error()
		return
	}
	old := r.region
	r.region, r.why = region, ""
	if old != nil && reflect.DeepEqual(old, region) {
		return
	}
	if r.mesh != nil && len(region.Nodes) < len(r.mesh.members) {
		// /derpmap serves what is known, but asking the user to paste a
		// region that lacks members (Services without an address yet)
		// would be asking twice.
		return
	}
	line, err := compactPolicyJSON(region)
	if err != nil {
		// /derpmap answers with the same error; nothing to paste yet.
		r.logger.Error("DERP region derpMap changed, but it cannot be written as the policy file's JSON", "region", c.RegionID, "err", err)
		return
	}
	r.logger.Info("DERP region derpMap changed; put it in the tailnet policy file's derpMap", "derpMap", line)
	r.event(false, "DERPMapChanged", "DERP region "+c.RegionCode+" derpMap: "+line)
}

// compactPolicyJSON is the policy file's derpMap for region on one line,
// for a log line and an Event.
func compactPolicyJSON(region *tailcfg.DERPRegion) (string, error) {
	js, err := PolicyJSON(region)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	if err := json.Compact(&b, js); err != nil {
		return "", fmt.Errorf("compact the derpMap JSON: %w", err)
	}
	return b.String(), nil
}

// event records an Event, if there is a recorder.
func (r *Instance) event(warning bool, reason, message string) {
	switch {
	case r.events == nil:
	case warning:
		r.events.Warning(reason, message)
	default:
		r.events.Normal(reason, message)
	}
}

// checkPin compares the certificate the region serves with the pin the
// tailnet's derpMap holds for the region, and says loudly when they stop
// agreeing, and again when they agree once more. They part when the
// self-signed certificate is made anew: it is kept with the node state, so
// an identity reset (deleting the state Secret) makes a new one, and every
// client then refuses the region (its pin no longer matches) while STUN
// still answers and nodes may keep choosing it as home. Only the policy can
// fix that: the new derpMap (relay derpmap) must replace the old one.
func (r *Instance) checkPin(ctx context.Context) {
	served := r.cert.CertName()
	if served == "" || r.tailnet == nil {
		return // a user-provided certificate is not pinned
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	dm, err := r.tailnet.CurrentDERPMap(ctx)
	if err != nil || dm == nil {
		return // no node yet, or no netmap: look again later
	}
	pinned := ""
	if reg := dm.Regions[r.cfg.RegionID]; reg != nil {
		for _, n := range reg.Nodes {
			if n.CertName != "" && n.CertName != served {
				pinned = n.CertName
			}
		}
	}
	r.mu.Lock()
	old := r.tailnetPin
	r.tailnetPin = pinned
	r.mu.Unlock()
	switch {
	case pinned != "" && pinned != old:
		r.logger.Error("the tailnet's derpMap pins another certificate for this DERP region, so clients refuse it; "+
			"the certificate was made anew (an identity reset deletes it with the node state): put the new derpMap "+
			"(relay derpmap) in the tailnet policy", "region", r.cfg.RegionID, "tailnetPin", pinned, "served", served)
		r.event(true, "DERPPinMismatch", fmt.Sprintf("the tailnet's derpMap pins %s for DERP region %d, but this relay serves %s "+
			"(made anew, e.g. by an identity reset): clients refuse the region until the policy has the new derpMap (relay derpmap)",
			pinned, r.cfg.RegionID, served))
	case pinned == "" && old != "":
		r.logger.Info("the tailnet's derpMap pins this DERP region's certificate again", "region", r.cfg.RegionID, "served", served)
		r.event(false, "DERPPinMatches", fmt.Sprintf("the tailnet's derpMap pins this relay's certificate for DERP region %d again", r.cfg.RegionID))
	}
}

// Readiness reports whether the region serves (DERP and STUN both), and if
// not, why, for /readyz; a nil region is ready.
func (r *Instance) Readiness() (ready bool, reason string) {
	if r == nil || r.srv.Serving() {
		return true, ""
	}
	return false, "DERP region " + r.cfg.RegionCode + " not serving"
}

// Warning says, when the tailnet's derpMap pins another certificate for
// the region than the one served, what to do, for /readyz?verbose's
// warnings; "" when it does not.
func (r *Instance) Warning() string {
	if r == nil {
		return ""
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tailnetPin == "" {
		return ""
	}
	return fmt.Sprintf("DERP region %d: the tailnet's derpMap pins %s, but this relay serves %s; clients refuse the region until the policy has the new derpMap (relay derpmap)",
		r.cfg.RegionID, r.tailnetPin, r.cert.CertName())
}

// ServeHTTP answers GET /derpmap: the policy file's derpMap as JSON, or
// with ?format=headscale the YAML for Headscale's derp.paths.
func (r *Instance) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	region, why := r.region, r.why
	r.mu.Unlock()
	if region == nil {
		http.Error(w, "no derpMap yet: "+why, http.StatusServiceUnavailable)
		return
	}
	var out []byte
	var err error
	switch f := req.URL.Query().Get("format"); f {
	case "", "json":
		w.Header().Set("Content-Type", "application/json")
		out, err = PolicyJSON(region)
	case "headscale", "yaml":
		w.Header().Set("Content-Type", "application/yaml")
		out, err = HeadscaleYAML(region)
	default:
		http.Error(w, fmt.Sprintf("format=%q: want json (the policy file's derpMap) or headscale (derp.paths YAML)", f), http.StatusBadRequest)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Write(out)
}

// Status returns the region's state for /readyz?verbose; nil when the
// region is off.
func (r *Instance) Status() *readyz.DERP {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	region, why, pin := r.region, r.why, r.tailnetPin
	r.mu.Unlock()
	s := &readyz.DERP{
		Serving: r.srv.Serving(), RegionID: r.cfg.RegionID, RegionCode: r.cfg.RegionCode,
		CertName: r.cert.CertName(), NoDERPMap: why, TailnetCertName: pin,
	}
	for _, p := range r.srv.MeshPeers() {
		s.MeshPeers = append(s.MeshPeers, readyz.MeshPeer{Name: p.Name, Addr: p.Addr, Connected: p.Connected, Since: p.Since, Error: p.Error})
	}
	if region != nil {
		s.DERPMap = &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{region.RegionID: region}}
	}
	return s
}

// Collector returns the region's Prometheus series (metrics.go); nil when
// the region is off.
func (r *Instance) Collector() prometheus.Collector {
	if r == nil {
		return nil
	}
	var status StatusSource
	if r.tailnet != nil {
		status = r.tailnet
	}
	return NewCollector(r.srv, status, r.cfg.RegionCode, r.logger)
}
