package derpregion

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/tsrelay/tsrelay/internal/envvar"
)

// Config are the settings of the in-cluster DERP region, read from the
// environment with the relay's (the relay embeds Config in its own, so
// that its variables are decoded, checked and listed by relay --help with
// the rest). The region is off unless TS_DERP_PORT is set.
type Config struct {
	DERPPort   envvar.Port `envconfig:"TS_DERP_PORT" desc:"TCP port for DERP over TLS of an in-cluster DERP region, so that first packets between nodes on this network stay on it; empty or 0 (default): no DERP and no STUN server. Needs TS_STUN_PORT. Add the region to the tailnet policy's derpMap (GET /derpmap on TS_LOCAL_ADDR_PORT)."`
	STUNPort   envvar.Port `envconfig:"TS_STUN_PORT" desc:"UDP port for the DERP region's STUN server (how nodes measure that the region is near); required with TS_DERP_PORT."`
	RegionID   int         `envconfig:"TS_DERP_REGION_ID" default:"900" desc:"ID of the DERP region, 900-999 (the range Tailscale keeps for a tailnet's own regions); unique in the tailnet's derpMap."`
	RegionCode string      `envconfig:"TS_DERP_REGION_CODE" default:"tsrelay" desc:"Short name of the DERP region, as tailscale ping shows it (via DERP(tsrelay)): lower-case letters, digits and '-'."`
	Addrs      IPList      `envconfig:"TS_DERP_ADDRS" desc:"Comma-separated IP addresses clients dial for the DERP region (one IPv4, one IPv6 used). Default: the IPs of the static endpoints (TS_RELAY_SERVER_STATIC_ENDPOINTS and TS_RELAY_SERVICE's load balancer)."`
	CertFile   string      `envconfig:"TS_DERP_CERT_FILE" desc:"PEM certificate for the DERP server (tls.crt of a mounted kubernetes.io/tls Secret), with TS_DERP_KEY_FILE and TS_DERP_HOSTNAME. Default: a self-signed certificate kept with the node state and pinned in the derpMap by its SHA-256."`
	KeyFile    string      `envconfig:"TS_DERP_KEY_FILE" desc:"PEM private key of TS_DERP_CERT_FILE (tls.key)."`
	HostName   string      `envconfig:"TS_DERP_HOSTNAME" desc:"DNS name TS_DERP_CERT_FILE is for; clients check the certificate against it."`

	// Limits on the public DERP port (guard.go); defaults from make
	// bench's abuse rows.
	MaxUnadmitted int     `envconfig:"TS_DERP_MAX_UNADMITTED" default:"256" desc:"Most DERP connections held open before their client is admitted (TLS, HTTP, DERP handshake, membership check); beyond it, a new connection closes the oldest waiting one (so strangers holding them all cannot keep a member out), and none waits more than 10 s. Admitted clients (tailnet members, mesh peers) do not count. Each held one costs up to about 65 KiB: 256 is about 17 MiB at most (README: Reliability)."`
	AcceptRate    float64 `envconfig:"TS_DERP_ACCEPT_RATE" default:"100" desc:"New DERP connections accepted per second, with a burst of 2 seconds' worth, before any TLS work; over it, a connection is closed at once and the client retries (as Tailscale's derper --accept-connection-limit). Raise it for a region with thousands of home nodes, which reconnect at this rate after a restart."`

	// The DERP mesh: several relays serving one region (mesh.go,
	// members.go).
	MeshSecret string      `envconfig:"TS_DERP_MESH_SECRET" desc:"With TS_KUBE_SECRET and TS_DERP_MESH_PEERS: the Secret holding the region's shared state (mesh-key, tls.crt, tls.key), in the pod's namespace; the first replica creates or completes it, the others adopt it. Every node of the region then serves the same self-signed certificate."`
	MeshFile   string      `envconfig:"TS_DERP_MESH_FILE" desc:"Outside a cluster (no TS_KUBE_SECRET), with TS_DERP_MESH_PEERS: a file holding the region's shared state (JSON: mesh-key, tls.crt, tls.key), created atomically if missing; several relays on one machine share it, other machines need a copy."`
	MeshPeers  MeshMembers `envconfig:"TS_DERP_MESH_PEERS" desc:"Comma-separated members of the meshed DERP region in derpMap order, this relay included: Service names with TS_DERP_MESH_SECRET, ip:port with TS_DERP_MESH_FILE, where ip:port is the address clients and the mesh dial for that member's DERP (e.g. the forwarded or load-balancer address). Outside a cluster this relay is the member whose IP is one of TS_DERP_ADDRS (default: the IPs of TS_RELAY_SERVER_STATIC_ENDPOINTS), and, if several share the IP, whose port is TS_DERP_PORT; in a cluster it is TS_RELAY_SERVICE."`
}

// Host is what the region needs to know of the relay that runs it: the
// relay's own settings that the region's are checked against, and that
// tell which mesh member this relay is.
type Host struct {
	// RelayPort and WireGuardPort are the process's UDP ports
	// (TS_RELAY_SERVER_PORT, TS_PORT; 0 for one picked at start).
	RelayPort, WireGuardPort uint16
	// HTTPAddr is where the process's HTTP server listens
	// (TS_LOCAL_ADDR_PORT), a TCP port too.
	HTTPAddr netip.AddrPort
	// StaticEndpoints are the relay's configured endpoints
	// (TS_RELAY_SERVER_STATIC_ENDPOINTS): outside a cluster, the default
	// of the IPs clients dial for the region, and so of this relay's own
	// mesh member.
	StaticEndpoints []netip.AddrPort
	// InCluster is true when the relay keeps its state in a Secret
	// (TS_KUBE_SECRET): mesh members are then Services.
	InCluster bool
	// Service is the relay's own Service (TS_RELAY_SERVICE): in a
	// cluster, this relay's mesh member.
	Service string
}

// MeshMembers is a comma-separated list of DERP mesh members, parsed
// further by Config.Validate (Service names or ip:port, depending on where
// the relay runs).
type MeshMembers []string

// Decode implements envconfig.Decoder.
func (m *MeshMembers) Decode(s string) error {
	*m = envvar.Fields(s)
	return nil
}

// IPList is a comma-separated list of IP addresses.
type IPList []netip.Addr

// Decode implements envconfig.Decoder.
func (l *IPList) Decode(s string) error {
	var out IPList
	for _, f := range envvar.Fields(s) {
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

// Enabled reports whether the DERP region is on.
func (c Config) Enabled() bool { return c.DERPPort != 0 || c.STUNPort != 0 }

// meshEnabled reports whether any mesh setting is set.
func (c Config) meshEnabled() bool {
	return c.MeshSecret != "" || c.MeshFile != "" || len(c.MeshPeers) > 0
}

// Validate checks the DERP settings, against each other and against the
// relay's (h), before anything is contacted, and reports every problem at
// once. Each error names the variable and the accepted form.
func (c Config) Validate(h Host) error {
	_, err := c.check(h)
	return err
}

// check is the one check of the DERP settings: Validate reports what it
// finds, and Setup builds the region from the mesh plan it returns (nil
// without a mesh), so a region is never built from settings that did not
// pass.
func (c Config) check(h Host) (*meshPlan, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !c.Enabled() {
		if c.CertFile != "" || c.KeyFile != "" || c.HostName != "" || len(c.Addrs) > 0 {
			bad("TS_DERP_CERT_FILE, TS_DERP_KEY_FILE, TS_DERP_HOSTNAME or TS_DERP_ADDRS is set but TS_DERP_PORT is not: set TS_DERP_PORT and TS_STUN_PORT to turn the DERP region on, or unset them")
		}
		if c.meshEnabled() {
			bad("TS_DERP_MESH_SECRET, TS_DERP_MESH_FILE or TS_DERP_MESH_PEERS is set but TS_DERP_PORT is not: a DERP mesh needs the DERP region on (TS_DERP_PORT and TS_STUN_PORT)")
		}
		return nil, errors.Join(errs...)
	}
	var plan *meshPlan
	if c.meshEnabled() {
		p, err := c.planMesh(h)
		if err != nil {
			errs = append(errs, envvar.Unjoin(err)...)
		}
		plan = p
	}
	if c.DERPPort == 0 {
		bad("TS_STUN_PORT=%d is set without TS_DERP_PORT: want both, a TCP port for DERP over TLS and a UDP port for STUN (e.g. TS_DERP_PORT=8443 TS_STUN_PORT=3478)", c.STUNPort)
	}
	if c.STUNPort == 0 {
		bad("TS_DERP_PORT=%d needs TS_STUN_PORT: the UDP port nodes measure the region's latency with (e.g. TS_STUN_PORT=3478)", c.DERPPort)
	}
	if c.STUNPort != 0 && (uint16(c.STUNPort) == h.RelayPort || uint16(c.STUNPort) == h.WireGuardPort) {
		bad("TS_STUN_PORT=%d: must differ from TS_RELAY_SERVER_PORT and TS_PORT, which are UDP sockets of this process too", c.STUNPort)
	}
	if c.DERPPort != 0 && uint16(c.DERPPort) == h.HTTPAddr.Port() {
		bad("TS_DERP_PORT=%d: must differ from the port of TS_LOCAL_ADDR_PORT=%s, both are TCP listeners of this process", c.DERPPort, h.HTTPAddr)
	}
	if err := ValidateRegion(c.RegionID, c.RegionCode, "TS_DERP_REGION_ID", "TS_DERP_REGION_CODE"); err != nil {
		errs = append(errs, envvar.Unjoin(err)...)
	}
	if c.MaxUnadmitted < 1 || c.MaxUnadmitted > 100_000 {
		bad("TS_DERP_MAX_UNADMITTED=%d: want a number of connections from 1 to 100000 (default 256)", c.MaxUnadmitted)
	}
	if !(c.AcceptRate >= 0.1 && c.AcceptRate <= 1e6) {
		bad("TS_DERP_ACCEPT_RATE=%v: want connections per second from 0.1 to 1000000 (default 100)", c.AcceptRate)
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		bad("TS_DERP_CERT_FILE and TS_DERP_KEY_FILE go together: want both (tls.crt and tls.key of a kubernetes.io/tls Secret) or neither (a self-signed certificate)")
	}
	if c.CertFile != "" && c.HostName == "" {
		bad("TS_DERP_CERT_FILE needs TS_DERP_HOSTNAME: the DNS name the certificate is for, which clients dial")
	}
	if c.HostName != "" && c.CertFile == "" {
		bad("TS_DERP_HOSTNAME=%s is set without TS_DERP_CERT_FILE: a self-signed certificate has a fixed name; want TS_DERP_CERT_FILE and TS_DERP_KEY_FILE too, or no TS_DERP_HOSTNAME", c.HostName)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return plan, nil
}

// dialIPs are the IPs clients dial for this relay's DERP server:
// TS_DERP_ADDRS, else the distinct IPs of endpoints, the relay's static
// endpoints (DERP and STUN share the load balancer's address). Validation
// passes the configured ones (Host.StaticEndpoints); the running region the
// ones advertised now, which add what the relay's Service found.
func (c Config) dialIPs(endpoints []netip.AddrPort) []netip.Addr {
	if len(c.Addrs) > 0 {
		return c.Addrs
	}
	var out []netip.Addr
	for _, ap := range endpoints {
		if a := ap.Addr().Unmap(); !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out
}

// isObjectName and isServiceName check Kubernetes names as the API server
// does: a Secret's (RFC 1123 subdomain) and a Service's (RFC 1035 label).
func isObjectName(s string) bool  { return len(validation.IsDNS1123Subdomain(s)) == 0 }
func isServiceName(s string) bool { return len(validation.IsDNS1035Label(s)) == 0 }
