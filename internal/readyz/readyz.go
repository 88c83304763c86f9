// Package readyz is the JSON document the relay serves at /readyz?verbose
// (or with Accept: application/json). The relay fills it and the tests, the
// demo and the benchmark decode it, so both sides use one definition; the
// field names are what users' scripts read, and TestFieldNames keeps them.
// It holds nothing secret.
package readyz

import (
	"net/netip"
	"time"

	"tailscale.com/tailcfg"
)

// Status is the whole document.
type Status struct {
	Ready bool `json:"ready"`
	// Reason is "ok" when ready, else one line that starts with the
	// condition (NeedsLogin, relay not bound, …): the body of a plain
	// /readyz.
	Reason       string       `json:"reason"`
	BackendState string       `json:"backendState"`
	DNSName      string       `json:"dnsName,omitempty"`
	TailscaleIPs []netip.Addr `json:"tailscaleIPs"`
	Relay        Relay        `json:"relay"`
	// Health is Tailscale's health warnings for the node.
	Health []string `json:"health,omitempty"`
	// PathMTU is the last check of the path MTU; nil before the first.
	PathMTU *PathMTU `json:"pathMTU,omitempty"`
	// Warnings are problems that slow relaying down without stopping it,
	// one line each. They do not affect readiness.
	Warnings []string `json:"warnings,omitempty"`
	// DERP is the in-cluster DERP region; absent when it is off.
	DERP *DERP `json:"derp,omitempty"`
	// State is the state Secret's; absent with a state directory.
	State *State `json:"state,omitempty"`
}

// State says whether the state Secret holds every write the relay made.
type State struct {
	Secret string `json:"secret"` // namespace/name
	// UnpersistedSince is when the Secret started lacking writes; absent
	// when it holds them all. The relay still relays, but a restart now
	// would lose them, perhaps the node identity.
	UnpersistedSince *time.Time `json:"unpersistedSince,omitempty"`
	PendingKeys      int        `json:"pendingKeys,omitempty"`
}

// Relay is the peer relay's part of the status.
type Relay struct {
	Port uint16 `json:"port"`
	// PrefsApplied is true when the node's relay prefs are the configured
	// ones.
	PrefsApplied bool `json:"prefsApplied"`
	// Bound is true when the relay server listens on Port.
	Bound bool `json:"bound"`
	// StaticEndpoints are the addresses advertised to peers: the explicit
	// ones, then those found from Service (see lbaddr.Merge).
	StaticEndpoints []Endpoint `json:"staticEndpoints"`
	// DroppedEndpoints were found but not advertised: past the 16 a relay
	// advertises, the last in StaticEndpoints' order.
	DroppedEndpoints []Endpoint `json:"droppedEndpoints,omitempty"`
	// Service is the Service endpoints are found from, namespace/name.
	Service string `json:"service,omitempty"`
	// Sessions is how many sessions (pairs of peers) the relay holds.
	Sessions int `json:"sessions"`
	// SessionTable is read live from the relay server for each request.
	SessionTable []Session `json:"sessionTable,omitempty"`
}

// Endpoint is an address peers can reach the relay on (lbaddr.Endpoint).
type Endpoint struct {
	AddrPort netip.AddrPort `json:"endpoint"`
	// Source is explicit, service or dns (lbaddr.Source).
	Source string `json:"source"`
}

// Session is one relayed pair of peers. Disco keys are left out: they mean
// nothing to people and change with every restart of a peer.
type Session struct {
	VNI     uint32    `json:"vni"`
	Clients [2]Client `json:"clients"`
}

// Client is one peer of a Session, as the relay sees it.
type Client struct {
	Endpoint  netip.AddrPort `json:"endpoint"`
	PacketsTx uint64         `json:"packetsTx"`
	BytesTx   uint64         `json:"bytesTx"`
}

// PathMTU is the last path MTU check.
type PathMTU struct {
	// OK is true when relayed packets fit and no tunnel inside a tunnel
	// was seen. It does not affect readiness.
	OK       bool   `json:"ok"`
	NeedIPv4 int    `json:"needIPv4"`
	NeedIPv6 int    `json:"needIPv6"`
	Paths    []Path `json:"paths"`
	// TunnelInTunnel says why the pod network looks like a tunnel inside a
	// Tailscale tunnel.
	TunnelInTunnel string `json:"tunnelInTunnel,omitempty"`
	// Error says why the check failed.
	Error string `json:"error,omitempty"`
}

// Path is one IP family's route out (pathmtu.Path), with the MTU packets
// get on it.
type Path struct {
	Family    string `json:"family"` // ipv4 or ipv6
	Interface string `json:"interface"`
	// Kind is the interface's link kind (veth, vxlan, tun, bridge, …);
	// empty for a plain device such as a physical NIC.
	Kind     string `json:"kind,omitempty"`
	LinkMTU  int    `json:"linkMTU"`
	RouteMTU int    `json:"routeMTU,omitempty"`
	MTU      int    `json:"mtu"`
	TooSmall bool   `json:"tooSmall"`
}

// DERP is the in-cluster DERP region's part of the status.
type DERP struct {
	// Serving is true when both the DERP and the STUN server serve; the
	// relay is not ready otherwise.
	Serving    bool   `json:"serving"`
	RegionID   int    `json:"regionID"`
	RegionCode string `json:"regionCode"`
	// CertName is what the derpMap pins: sha256-raw:<hex> for the
	// self-signed certificate, empty for a user-provided one.
	CertName string `json:"certName,omitempty"`
	// DERPMap is the value for the policy file's "derpMap"; absent until
	// an address is known, with NoDERPMap saying why.
	DERPMap   *tailcfg.DERPMap `json:"derpMap,omitempty"`
	NoDERPMap string           `json:"noDERPMap,omitempty"`
	// TailnetCertName is the pin the tailnet's derpMap (as this relay's
	// node receives it) holds for the region when it differs from
	// CertName: clients refuse the region's certificate until the policy
	// gets the new derpMap. Absent when they agree or the tailnet's
	// derpMap lacks the region.
	TailnetCertName string `json:"tailnetCertName,omitempty"`
	// MeshPeers are the links to the region's other nodes
	// (TS_DERP_MESH_PEERS), in that order; absent without a mesh.
	// Readiness does not wait for them.
	MeshPeers []MeshPeer `json:"meshPeers,omitempty"`
}

// MeshPeer is the state of the DERP mesh link to another node of the
// region.
type MeshPeer struct {
	Name string `json:"name"` // as in TS_DERP_MESH_PEERS
	// Addr is the address dialled last; absent while none is known.
	Addr      string `json:"addr,omitempty"`
	Connected bool   `json:"connected"`
	// Since is when Connected last changed.
	Since time.Time `json:"since"`
	// Error is the last connection error while not connected.
	Error string `json:"error,omitempty"`
}
