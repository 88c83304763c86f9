//go:build !tsrelay_upstream_relayserver

package relayserver

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"tailscale.com/disco"
	"tailscale.com/feature"
	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnext"
	"tailscale.com/ipn/localapi"
	"tailscale.com/net/udprelay"
	"tailscale.com/net/udprelay/status"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
	"tailscale.com/types/views"
	"tailscale.com/util/eventbus"
	"tailscale.com/util/usermetric"
	"tailscale.com/wgengine/magicsock"
)

// Name is the name this extension registers with tailscale.com/feature and
// ipnext. It is the upstream feature's name, so that code asking whether "a
// relay server" is linked gets the same answer whichever one is, and so that
// linking both fails at start instead of running two.
const Name = "relayserver"

// rejectedMetric is the user metric counting rejected requests.
const rejectedMetric = "tsrelay_relay_alloc_rejected_total"

func init() {
	// Registration is what linking a Tailscale feature means: ipnext keeps a
	// process-wide table of extension constructors, and each node (tsnet
	// server) gets its own extension from it.
	feature.Register(Name)
	ipnext.RegisterExtension(Name, newExtension)
	localapi.Register("debug-peer-relay-sessions", serveSessions)
}

// rejectLabel is the label set of tsrelay_relay_alloc_rejected_total.
type rejectLabel struct {
	Reason string `prom:"reason"`
}

// extension runs the relay server while the node's prefs ask for one (a
// RelayServerPort) and the tailnet does not forbid it
// (NodeAttrDisableRelayServer), and answers allocation requests that pass
// Check.
type extension struct {
	logf     logger.Logf
	sb       ipnext.SafeBackend
	bus      *eventbus.Client
	respPub  *eventbus.Publisher[magicsock.UDPRelayAllocResp]
	rejPub   *eventbus.Publisher[Rejected]
	filtPub  *eventbus.Publisher[SocketsFiltered]
	rejected *usermetric.MultiLabelMap[rejectLabel]
	now      func() time.Time

	mu              sync.Mutex
	shutdown        bool
	srv             *udprelay.Server // nil when not running
	port            *uint16          // RelayServerPort; nil when unset
	staticEndpoints views.Slice[netip.AddrPort]
	derpMap         tailcfg.DERPMapView
	disabledByNode  bool            // the self node has NodeAttrDisableRelayServer
	serverDisco     key.DiscoPublic // srv's disco key, from its first answer
	senders         *senders
}

// newExtension is the ipnext constructor: one extension per node.
func newExtension(logf logger.Logf, sb ipnext.SafeBackend) (ipnext.Extension, error) {
	e := &extension{
		logf:    logger.WithPrefix(logf, Name+": "),
		sb:      sb,
		now:     time.Now,
		senders: newSenders(),
	}
	e.rejected = usermetric.NewMultiLabelMapWithRegistry[rejectLabel](sb.Sys().UserMetricsRegistry(), rejectedMetric, "counter",
		"Relay endpoint allocation requests tsrelay rejected before the relay server saw them, by reason.")
	for _, r := range reasons() {
		e.rejected.Add(rejectLabel{string(r)}, 0) // every reason from the start, so rate() works on the first one
	}
	e.bus = sb.Sys().Bus.Get().Client("tsrelay.relayserver")
	e.respPub = eventbus.Publish[magicsock.UDPRelayAllocResp](e.bus)
	e.rejPub = eventbus.Publish[Rejected](e.bus)
	e.filtPub = eventbus.Publish[SocketsFiltered](e.bus)
	eventbus.SubscribeFunc(e.bus, e.onDERPMap)
	eventbus.SubscribeFunc(e.bus, e.onAllocReq)
	return e, nil
}

// Name implements ipnext.Extension.
func (e *extension) Name() string { return Name }

// Init implements ipnext.Extension: it follows the prefs and the self node.
func (e *extension) Init(host ipnext.Host) error {
	_, prefs := host.Profiles().CurrentProfileState()
	e.onPrefs(ipn.LoginProfileView{}, prefs, false)
	host.Hooks().ProfileStateChange.Add(e.onPrefs)
	host.Hooks().OnSelfChange.Add(e.onSelf)
	return nil
}

// Shutdown implements ipnext.Extension. The bus client is closed first and
// without e.mu: Close waits for the subscriber callbacks, which take e.mu.
func (e *extension) Shutdown() error {
	e.bus.Close()
	e.mu.Lock()
	defer e.mu.Unlock()
	e.shutdown = true
	e.stopLocked()
	return nil
}

// onPrefs follows RelayServerPort and RelayServerStaticEndpoints. A new
// port, or another node (profile), restarts the server.
func (e *extension) onPrefs(_ ipn.LoginProfileView, prefs ipn.PrefsView, sameNode bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.staticEndpoints = prefs.RelayServerStaticEndpoints()
	port, ok := prefs.RelayServerPort().GetOk()
	if changed := ok != (e.port != nil) || (ok && port != *e.port); changed || !sameNode {
		e.stopLocked()
		e.port = nil
		if ok {
			e.port = &port
		}
	}
	e.reconcileLocked()
}

// onSelf follows the tailnet's NodeAttrDisableRelayServer on this node.
func (e *extension) onSelf(self tailcfg.NodeView) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.disabledByNode = self.HasCap(tailcfg.NodeAttrDisableRelayServer)
	e.reconcileLocked()
}

// onDERPMap gives the server the DERP map, which it uses to find its
// addresses as seen from outside (STUN).
func (e *extension) onDERPMap(m tailcfg.DERPMapView) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.derpMap = m
	if e.srv != nil {
		e.srv.SetDERPMapView(m)
	}
}

func (e *extension) wantLocked() bool {
	return !e.shutdown && e.port != nil && !e.disabledByNode
}

// reconcileLocked starts or stops the server as wanted, and keeps its
// static endpoints current.
func (e *extension) reconcileLocked() {
	if !e.wantLocked() {
		e.stopLocked()
		return
	}
	if e.srv == nil {
		e.startLocked()
	}
	if e.srv != nil {
		e.srv.SetStaticAddrPorts(e.staticEndpoints)
	}
}

// startLocked starts the server on e.port. A failure (the port in use) is
// logged and tried again at the next change or request; the relay's
// readiness reports it, because the server then has no port.
func (e *extension) startLocked() {
	sys := e.sb.Sys()
	srv, err := udprelay.NewServer(e.logf, *e.port, false, sys.UserMetricsRegistry(), sys.ControlKnobs())
	if err != nil {
		e.logf("start relay server on port %d: %v", *e.port, err)
		return
	}
	srv.SetDERPMapView(e.derpMap)
	e.srv = srv
	e.serverDisco = key.DiscoPublic{} // a new server has a new key
	// The server's read loops already run: what arrives before the filter
	// is read as before.
	n, err := filterSockets(*e.port)
	if err != nil {
		e.logf("[unexpected] relay sockets on port %d: %d filtered: %v", *e.port, n, err)
	}
	go e.filtPub.Publish(SocketsFiltered{Port: *e.port, Filtered: n, Err: err})
}

func (e *extension) stopLocked() {
	if e.srv != nil {
		e.srv.Close()
		e.srv = nil
	}
}

// onAllocReq answers an allocation request that passes Check, from a sender
// within its rate. It runs on an event-bus goroutine: nothing here may panic.
func (e *extension) onAllocReq(req magicsock.UDPRelayAllocReq) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.wantLocked() {
		return
	}
	if why := Check(req, e.serverDisco); why != ReasonNone {
		e.rejectLocked(req, why)
		return
	}
	if !e.senders.allowAlloc(req.RxFromNodeKey) {
		e.rejectLocked(req, ReasonRateLimited)
		return
	}
	if e.srv == nil {
		e.startLocked() // a start that failed before
		if e.srv == nil {
			return
		}
	}
	se, err := e.srv.AllocateEndpoint(req.Message.ClientDisco[0], req.Message.ClientDisco[1])
	if err != nil {
		var notReady udprelay.ErrServerNotReady
		if !errors.As(err, &notReady) { // not ready: the client asks again
			e.logf("allocate endpoint for %v: %v", req.RxFromNodeKey.ShortString(), err)
		}
		return
	}
	e.serverDisco = se.ServerDisco
	resp := magicsock.UDPRelayAllocResp{
		ReqRxFromNodeKey:  req.RxFromNodeKey,
		ReqRxFromDiscoKey: req.RxFromDiscoKey,
		Message: &disco.AllocateUDPRelayEndpointResponse{
			Generation: req.Message.Generation,
			UDPRelayEndpoint: disco.UDPRelayEndpoint{
				ServerDisco:         se.ServerDisco,
				ClientDisco:         se.ClientDisco,
				LamportID:           se.LamportID,
				VNI:                 se.VNI,
				BindLifetime:        se.BindLifetime.Duration,
				SteadyStateLifetime: se.SteadyStateLifetime.Duration,
				AddrPorts:           se.AddrPorts,
			},
		},
	}
	// Published from another goroutine: magicsock receives it on a
	// subscriber that may wait on a lock held by whoever publishes requests
	// (tailscale/tailscale#17830).
	go e.respPub.Publish(resp)
}

// rejectLocked counts a rejected request and reports it if the sender was
// not reported within LogInterval.
func (e *extension) rejectLocked(req magicsock.UDPRelayAllocReq, why Reason) {
	e.rejected.Add(rejectLabel{string(why)}, 1)
	publish, suppressed := e.senders.report(req.RxFromNodeKey, e.now())
	if !publish {
		return
	}
	ev := Rejected{From: req.RxFromNodeKey, Disco: req.RxFromDiscoKey, Reason: why, Suppressed: suppressed}
	e.logf("rejected an endpoint allocation request from %v: %s (%d more not logged)", ev.From.ShortString(), why, suppressed)
	go e.rejPub.Publish(ev)
}

// status is what debug-peer-relay-sessions serves: the port while the
// server runs, and its sessions.
func (e *extension) status() status.ServerStatus {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.srv == nil {
		return status.ServerStatus{}
	}
	port := *e.port
	return status.ServerStatus{UDPPort: &port, Sessions: e.srv.GetSessions()}
}

// serveSessions serves the local API's debug-peer-relay-sessions as the
// upstream feature does (a JSON status.ServerStatus), which `tailscale debug
// peer-relay-sessions` and the relay's readiness read.
func serveSessions(h *localapi.Handler, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		http.Error(w, "GET required", http.StatusMethodNotAllowed)
		return
	}
	var e *extension
	if !h.LocalBackend().FindMatchingExtension(&e) {
		http.Error(w, "relay server extension not running", http.StatusInternalServerError)
		return
	}
	b, err := json.Marshal(e.status())
	if err != nil {
		http.Error(w, fmt.Sprintf("encode relay status: %v", err), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}
