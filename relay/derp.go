package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/ipn/store"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/kubeevents"
)

// DERPConfig are the settings of the in-cluster DERP region (package
// derpregion). It is off unless TS_DERP_PORT is set.
type DERPConfig struct {
	DERPPort   Port   `envconfig:"TS_DERP_PORT" desc:"TCP port for DERP over TLS of an in-cluster DERP region, so that first packets between nodes on this network stay on it; empty or 0 (default): no DERP and no STUN server. Needs TS_STUN_PORT. Add the region to the tailnet policy's derpMap (GET /derpmap on TS_LOCAL_ADDR_PORT)."`
	STUNPort   Port   `envconfig:"TS_STUN_PORT" desc:"UDP port for the DERP region's STUN server (how nodes measure that the region is near); required with TS_DERP_PORT."`
	RegionID   int    `envconfig:"TS_DERP_REGION_ID" default:"900" desc:"ID of the DERP region, 900-999 (the range Tailscale keeps for a tailnet's own regions); unique in the tailnet's derpMap."`
	RegionCode string `envconfig:"TS_DERP_REGION_CODE" default:"tsrelay" desc:"Short name of the DERP region, as tailscale ping shows it (via DERP(tsrelay)): lower-case letters, digits and '-'."`
	Addrs      IPList `envconfig:"TS_DERP_ADDRS" desc:"Comma-separated IP addresses clients dial for the DERP region (one IPv4, one IPv6 used). Default: the IPs of the static endpoints (TS_RELAY_SERVER_STATIC_ENDPOINTS and TS_RELAY_SERVICE's load balancer)."`
	CertFile   string `envconfig:"TS_DERP_CERT_FILE" desc:"PEM certificate for the DERP server (tls.crt of a mounted kubernetes.io/tls Secret), with TS_DERP_KEY_FILE and TS_DERP_HOSTNAME. Default: a self-signed certificate kept with the node state and pinned in the derpMap by its SHA-256."`
	KeyFile    string `envconfig:"TS_DERP_KEY_FILE" desc:"PEM private key of TS_DERP_CERT_FILE (tls.key)."`
	HostName   string `envconfig:"TS_DERP_HOSTNAME" desc:"DNS name TS_DERP_CERT_FILE is for; clients check the certificate against it."`

	// Limits on the public DERP port (derpregion/guard.go); defaults from
	// make bench's abuse rows.
	MaxUnadmitted int     `envconfig:"TS_DERP_MAX_UNADMITTED" default:"256" desc:"Most DERP connections held open before their client is admitted (TLS, HTTP, DERP handshake, membership check); beyond it, a new connection closes the oldest waiting one (so strangers holding them all cannot keep a member out), and none waits more than 10 s. Admitted clients (tailnet members, mesh peers) do not count. Each held one costs up to about 65 KiB: 256 is about 17 MiB at most (README: Reliability)."`
	AcceptRate    float64 `envconfig:"TS_DERP_ACCEPT_RATE" default:"100" desc:"New DERP connections accepted per second, with a burst of 2 seconds' worth, before any TLS work; over it, a connection is closed at once and the client retries (as Tailscale's derper --accept-connection-limit). Raise it for a region with thousands of home nodes, which reconnect at this rate after a restart."`

	// The DERP mesh: several relays serving one region (mesh.go).
	MeshSecret string      `envconfig:"TS_DERP_MESH_SECRET" desc:"With TS_KUBE_SECRET and TS_DERP_MESH_PEERS: the Secret holding the region's shared state (mesh-key, tls.crt, tls.key), in the pod's namespace; the first replica creates or completes it, the others adopt it. Every node of the region then serves the same self-signed certificate."`
	MeshFile   string      `envconfig:"TS_DERP_MESH_FILE" desc:"Outside a cluster (no TS_KUBE_SECRET), with TS_DERP_MESH_PEERS: a file holding the region's shared state (JSON: mesh-key, tls.crt, tls.key), created atomically if missing; several relays on one machine share it, other machines need a copy."`
	MeshPeers  MeshMembers `envconfig:"TS_DERP_MESH_PEERS" desc:"Comma-separated members of the meshed DERP region in derpMap order, this relay included: Service names with TS_DERP_MESH_SECRET, ip:port with TS_DERP_MESH_FILE, where ip:port is the address clients and the mesh dial for that member's DERP (e.g. the forwarded or load-balancer address). Outside a cluster this relay is the member whose IP is one of TS_DERP_ADDRS (default: the IPs of TS_RELAY_SERVER_STATIC_ENDPOINTS), and, if several share the IP, whose port is TS_DERP_PORT; in a cluster it is TS_RELAY_SERVICE."`
}

// MeshMembers is a comma-separated list of DERP mesh members, parsed
// further by DERPConfig.validate (Service names or ip:port, depending on
// where the relay runs).
type MeshMembers []string

// Decode implements envconfig.Decoder.
func (m *MeshMembers) Decode(s string) error {
	var out MeshMembers
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	*m = out
	return nil
}

// IPList is a comma-separated list of IP addresses.
type IPList []netip.Addr

// Decode implements envconfig.Decoder.
func (l *IPList) Decode(s string) error {
	var out IPList
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil || a.Zone() != "" || a.IsUnspecified() || a.IsMulticast() {
			return fmt.Errorf("%q is not a unicast IP address; want comma-separated IPv4 or IPv6 addresses (no ports, no brackets)", f)
		}
		if a = a.Unmap(); !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	*l = out
	return nil
}

// enabled reports whether the DERP region is on.
func (d DERPConfig) enabled() bool { return d.DERPPort != 0 || d.STUNPort != 0 }

// validate checks the DERP settings against the rest of the configuration.
func (d DERPConfig) validate(c *Config) []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !d.enabled() {
		if d.CertFile != "" || d.KeyFile != "" || d.HostName != "" || len(d.Addrs) > 0 {
			bad("TS_DERP_CERT_FILE, TS_DERP_KEY_FILE, TS_DERP_HOSTNAME or TS_DERP_ADDRS is set but TS_DERP_PORT is not: set TS_DERP_PORT and TS_STUN_PORT to turn the DERP region on, or unset them")
		}
		if d.meshEnabled() {
			bad("TS_DERP_MESH_SECRET, TS_DERP_MESH_FILE or TS_DERP_MESH_PEERS is set but TS_DERP_PORT is not: a DERP mesh needs the DERP region on (TS_DERP_PORT and TS_STUN_PORT)")
		}
		return errs
	}
	if d.meshEnabled() {
		if _, err := d.meshMembers(c); err != nil {
			errs = append(errs, err)
		}
	}
	if d.DERPPort == 0 {
		bad("TS_STUN_PORT=%d is set without TS_DERP_PORT: want both, a TCP port for DERP over TLS and a UDP port for STUN (e.g. TS_DERP_PORT=8443 TS_STUN_PORT=3478)", d.STUNPort)
	}
	if d.STUNPort == 0 {
		bad("TS_DERP_PORT=%d needs TS_STUN_PORT: the UDP port nodes measure the region's latency with (e.g. TS_STUN_PORT=3478)", d.DERPPort)
	}
	if d.STUNPort != 0 && (d.STUNPort == c.RelayServerPort || d.STUNPort == c.WireGuardPort) {
		bad("TS_STUN_PORT=%d: must differ from TS_RELAY_SERVER_PORT and TS_PORT, which are UDP sockets of this process too", d.STUNPort)
	}
	if d.DERPPort != 0 && uint16(d.DERPPort) == c.LocalAddrPort.Port() {
		bad("TS_DERP_PORT=%d: must differ from the port of TS_LOCAL_ADDR_PORT=%s, both are TCP listeners of this process", d.DERPPort, c.LocalAddrPort)
	}
	if err := derpregion.ValidateRegion(d.RegionID, d.RegionCode, "TS_DERP_REGION_ID", "TS_DERP_REGION_CODE"); err != nil {
		errs = append(errs, err)
	}
	if d.MaxUnadmitted < 1 || d.MaxUnadmitted > 100_000 {
		bad("TS_DERP_MAX_UNADMITTED=%d: want a number of connections from 1 to 100000 (default 256)", d.MaxUnadmitted)
	}
	if !(d.AcceptRate >= 0.1 && d.AcceptRate <= 1e6) {
		bad("TS_DERP_ACCEPT_RATE=%v: want connections per second from 0.1 to 1000000 (default 100)", d.AcceptRate)
	}
	if (d.CertFile == "") != (d.KeyFile == "") {
		bad("TS_DERP_CERT_FILE and TS_DERP_KEY_FILE go together: want both (tls.crt and tls.key of a kubernetes.io/tls Secret) or neither (a self-signed certificate)")
	}
	if d.CertFile != "" && d.HostName == "" {
		bad("TS_DERP_CERT_FILE needs TS_DERP_HOSTNAME: the DNS name the certificate is for, which clients dial")
	}
	if d.HostName != "" && d.CertFile == "" {
		bad("TS_DERP_HOSTNAME=%s is set without TS_DERP_CERT_FILE: a self-signed certificate has a fixed name; want TS_DERP_CERT_FILE and TS_DERP_KEY_FILE too, or no TS_DERP_HOSTNAME", d.HostName)
	}
	return errs
}

// derpCertStateFile holds the self-signed certificate when the node state
// is in TS_STATE_DIR. Not tsnet's own state file: two file stores on one
// file would overwrite each other's keys.
const derpCertStateFile = "tsrelay-derp.json"

// derpRegion is the running DERP region: the servers, the certificate and
// the derpMap for the addresses currently known. A nil *derpRegion is a
// relay without one: its methods do nothing.
type derpRegion struct {
	cfg    DERPConfig
	srv    *derpregion.Server
	cert   *derpregion.Cert
	logger *slog.Logger
	events *kubeevents.Recorder
	// mesh is the region's members when TS_DERP_MESH_PEERS is set.
	mesh *meshPlan
	// svcs follows the members' Services (Service-name members), or nil.
	svcs *meshServices
	// status has the relay's static endpoints, whose IPs clients dial
	// when TS_DERP_ADDRS is empty, and tells when they change.
	status *status

	// node is the relay's tailnet node, through which the tailnet's
	// derpMap is read for checkPin.
	node *appliance

	mu     sync.Mutex
	region *tailcfg.DERPRegion // nil until an address is known
	why    string              // why region is nil
	// tailnetPin is the CertName the tailnet's derpMap pins for the
	// region when it is not the served certificate's, else "".
	tailnetPin string
}

// pinCheckInterval is how often the region compares the certificate it
// serves with the pin in the tailnet's derpMap: the first look comes this
// long after start, when the node has its netmap.
const pinCheckInterval = 5 * time.Second

// newDERPRegion returns the DERP region cfg asks for, or nil when it asks
// for none. It loads or creates the certificate and binds the DERP and STUN
// sockets. stateStore is the node's Secret store, or nil for a file in
// TS_STATE_DIR; node admits DERP clients; the region's readiness becomes
// part of st's.
func newDERPRegion(ctx context.Context, cfg Config, kc *kubeclient.Client, stateStore ipn.StateStore, st *status, node *appliance, events *kubeevents.Recorder, logger *slog.Logger) (*derpRegion, error) {
	d, stateDir := cfg.DERPConfig, cfg.StateDir
	if !d.enabled() {
		return nil, nil
	}
	var cert *derpregion.Cert
	var err error
	var mesh *meshPlan
	var meshKey key.DERPMesh
	var meshPeers []derpregion.MeshPeer
	var svcs *meshServices
	if d.meshEnabled() {
		plan, err := d.meshMembers(&cfg) // checked by Validate; here for the plan
		if err != nil {
			return nil, err
		}
		mesh = &plan
		shared, err := loadMeshShared(ctx, d, kc, time.Now())
		if err != nil {
			return nil, err
		}
		cert, meshKey = shared.Cert, shared.MeshKey
		svcs = newMeshServices(mesh, kc, logger)
		meshPeers = plan.peers(svcs)
	} else if d.CertFile != "" {
		cert, err = derpregion.FromFiles(d.CertFile, d.KeyFile, d.HostName)
	} else {
		st := derpregion.Store(stateStore)
		if stateStore == nil {
			if st, err = store.NewFileStore(func(string, ...any) {}, filepath.Join(stateDir, derpCertStateFile)); err != nil {
				return nil, fmt.Errorf("open the DERP certificate store in TS_STATE_DIR=%s: %w", stateDir, err)
			}
		}
		cert, err = derpregion.SelfSigned(st, time.Now())
	}
	if err != nil {
		return nil, err
	}
	srv, err := derpregion.Listen(derpregion.ServerConfig{
		DERPAddr:  net.JoinHostPort("", strconv.Itoa(int(d.DERPPort))),
		STUNAddr:  net.JoinHostPort("", strconv.Itoa(int(d.STUNPort))),
		TLS:       cert,
		Node:      applianceNode{node},
		Logger:    logger.With("src", "derp"),
		MeshKey:   meshKey,
		MeshPeers: meshPeers,

		MaxUnadmitted: d.MaxUnadmitted,
		AcceptRate:    d.AcceptRate,
	})
	if err != nil {
		return nil, fmt.Errorf("DERP region (TS_DERP_PORT=%d, TS_STUN_PORT=%d): %w", d.DERPPort, d.STUNPort, err)
	}
	if cert.Created() {
		logger.Info("created a self-signed DERP certificate; add the region to the tailnet policy's derpMap", "fingerprint", cert.Fingerprint())
	}
	if mesh != nil {
		// Never the key itself: only which member this relay is.
		logger.Info("DERP mesh", "self", mesh.members[mesh.self].name, "members", len(mesh.members), "sharedState", meshLocation(d))
	}
	r := &derpRegion{cfg: d, srv: srv, cert: cert, mesh: mesh, svcs: svcs, logger: logger, events: events, status: st, node: node}
	st.setDERP(derpView{code: d.RegionCode, serving: srv.Serving, pinWarning: r.pinWarning})
	r.update()
	return r, nil
}

// run serves the region until ctx is done, refreshing the derpMap as soon
// as the advertised endpoints change.
func (r *derpRegion) run(ctx context.Context) error {
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
		case <-r.status.endpointsChanged():
			r.update()
		case <-svcsChanged:
			if r.svcs.refresh() {
				r.update()
			}
		}
	}
}

// close releases the sockets of a region that never ran.
func (r *derpRegion) close() {
	if r != nil {
		r.srv.Close()
	}
}

// dialAddrs are the IPs clients dial: TS_DERP_ADDRS, or the static
// endpoints' IPs (the load balancer's: DERP and STUN share its address).
func (r *derpRegion) dialAddrs() []netip.Addr {
	if len(r.cfg.Addrs) > 0 {
		return r.cfg.Addrs
	}
	var out []netip.Addr
	for _, ap := range r.status.advertised() {
		if !slices.Contains(out, ap.Addr()) {
			out = append(out, ap.Addr())
		}
	}
	return out
}

// update recomputes the derpMap and, when it changed, logs it once and
// records an Event: the user must paste it into the policy again.
func (r *derpRegion) update() {
	d := r.cfg
	region, err := derpregion.Region(derpregion.RegionOptions{
		RegionID: d.RegionID, RegionCode: d.RegionCode, Cert: r.cert,
		Addrs:    r.dialAddrs(),
		DERPPort: int(d.DERPPort), STUNPort: int(d.STUNPort),
		Members: r.mesh.regionMembers(d.Addrs, r.dialAddrs(), r.svcs),
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
	js, err := derpregion.PolicyJSON(region)
	if err != nil {
		return
	}
	compact := new(bytes.Buffer)
	if err := json.Compact(compact, js); err != nil {
		return
	}
	r.logger.Info("DERP region derpMap changed; put it in the tailnet policy file's derpMap", "derpMap", compact.String())
	r.events.Normal("DERPMapChanged", "DERP region "+d.RegionCode+" derpMap: "+compact.String())
}

// checkPin compares the certificate the region serves with the pin the
// tailnet's derpMap holds for the region, and says loudly when they stop
// agreeing, and again when they agree once more. They part when the
// self-signed certificate is made anew: it is kept with the node state, so
// an identity reset (deleting the state Secret) makes a new one, and every
// client then refuses the region (its pin no longer matches) while STUN
// still answers and nodes may keep choosing it as home. Only the policy can
// fix that: the new derpMap (relay derpmap) must replace the old one.
func (r *derpRegion) checkPin(ctx context.Context) {
	served := r.cert.CertName()
	lc := r.node.localClient()
	if served == "" || lc == nil {
		return // a user-provided certificate is not pinned; no node yet
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	dm, err := lc.CurrentDERPMap(ctx)
	if err != nil || dm == nil {
		return
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
		r.events.Warning("DERPPinMismatch", fmt.Sprintf("the tailnet's derpMap pins %s for DERP region %d, but this relay serves %s "+
			"(made anew, e.g. by an identity reset): clients refuse the region until the policy has the new derpMap (relay derpmap)",
			pinned, r.cfg.RegionID, served))
	case pinned == "" && old != "":
		r.logger.Info("the tailnet's derpMap pins this DERP region's certificate again", "region", r.cfg.RegionID, "served", served)
		r.events.Normal("DERPPinMatches", fmt.Sprintf("the tailnet's derpMap pins this relay's certificate for DERP region %d again", r.cfg.RegionID))
	}
}

// pinWarning is checkPin's finding for /readyz?verbose's warnings.
func (r *derpRegion) pinWarning() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tailnetPin == "" {
		return ""
	}
	return fmt.Sprintf("DERP region %d: the tailnet's derpMap pins %s, but this relay serves %s; clients refuse the region until the policy has the new derpMap (relay derpmap)",
		r.cfg.RegionID, r.tailnetPin, r.cert.CertName())
}

// serveDERPMap answers GET /derpmap: the policy file's derpMap as JSON, or
// with ?format=headscale the YAML for Headscale's derp.paths.
func (r *derpRegion) serveDERPMap(w http.ResponseWriter, req *http.Request) {
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
		out, err = derpregion.PolicyJSON(region)
	case "headscale", "yaml":
		w.Header().Set("Content-Type", "application/yaml")
		out, err = derpregion.HeadscaleYAML(region)
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

// statusJSON returns the region's state for /readyz?verbose; nil when the
// region is off.
func (r *derpRegion) statusJSON() *readyz.DERP {
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

// applianceNode admits DERP clients through the appliance's tailnet node,
// refusing everyone before it has started.
type applianceNode struct{ a *appliance }

var errNodeNotStarted = errors.New("tailnet node not started")

func (n applianceNode) StatusWithoutPeers(ctx context.Context) (*ipnstate.Status, error) {
	lc := n.a.localClient()
	if lc == nil {
		return nil, errNodeNotStarted
	}
	return lc.StatusWithoutPeers(ctx)
}

func (n applianceNode) WhoIsNodeKey(ctx context.Context, k key.NodePublic) (*apitype.WhoIsResponse, error) {
	lc := n.a.localClient()
	if lc == nil {
		return nil, errNodeNotStarted
	}
	return lc.WhoIsNodeKey(ctx, k)
}

func (n applianceNode) Status(ctx context.Context) (*ipnstate.Status, error) {
	lc := n.a.localClient()
	if lc == nil {
		return nil, errNodeNotStarted
	}
	return lc.Status(ctx)
}
