package relay

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/kubestate"
)

// meshMember is one node of a meshed DERP region, as TS_DERP_MESH_PEERS
// names it.
type meshMember struct {
	// name is the entry as written: a Service name or ip:port.
	name string
	// addr is where clients and the mesh dial the member's DERP server
	// (ip:port entries); invalid for a Service name, whose addresses come
	// from the Service.
	addr netip.AddrPort
}

// meshPlan is the region's members in derpMap order and which one is
// this relay.
type meshPlan struct {
	members []meshMember
	self    int
}

// meshEnabled reports whether any mesh setting is set.
func (d DERPConfig) meshEnabled() bool {
	return d.MeshSecret != "" || d.MeshFile != "" || len(d.MeshPeers) > 0
}

// meshMembers checks the mesh settings and returns the members with this
// relay identified, before anything is contacted. Outside a cluster this
// relay is the ip:port entry whose IP is one of its own DERP addresses
// (TS_DERP_ADDRS, else the IPs of TS_RELAY_SERVER_STATIC_ENDPOINTS), and
// among several with that IP the one whose port is TS_DERP_PORT (several
// relays on one machine listen on distinct ports). In a cluster it is the
// entry equal to TS_RELAY_SERVICE.
func (d DERPConfig) meshMembers(c *Config) (meshPlan, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	inCluster := c.KubeSecret != ""
	switch {
	case d.MeshSecret != "" && d.MeshFile != "":
		bad("TS_DERP_MESH_SECRET and TS_DERP_MESH_FILE are both set: want one, the Secret with TS_KUBE_SECRET or the file without it")
	case d.MeshSecret != "" && !inCluster:
		bad("TS_DERP_MESH_SECRET=%s needs TS_KUBE_SECRET (the relay's state in a Secret); outside a cluster use TS_DERP_MESH_FILE=<path>", d.MeshSecret)
	case d.MeshFile != "" && inCluster:
		bad("TS_DERP_MESH_FILE=%s is for relays outside a cluster, but TS_KUBE_SECRET is set: use TS_DERP_MESH_SECRET=<Secret name>", d.MeshFile)
	case d.MeshSecret == "" && d.MeshFile == "":
		bad("TS_DERP_MESH_PEERS needs the region's shared state: TS_DERP_MESH_SECRET=<Secret name> with TS_KUBE_SECRET, or TS_DERP_MESH_FILE=<path> without it")
	}
	if d.MeshSecret != "" && (len(d.MeshSecret) > 253 || !secretNameRE.MatchString(d.MeshSecret)) {
		bad("TS_DERP_MESH_SECRET=%s: want a Kubernetes object name (lower-case letters, digits, '-' and '.')", d.MeshSecret)
	}
	if (d.MeshSecret != "" || d.MeshFile != "") && len(d.MeshPeers) == 0 {
		bad("TS_DERP_MESH_SECRET or TS_DERP_MESH_FILE needs TS_DERP_MESH_PEERS: the region's members, this relay included (e.g. TS_DERP_MESH_PEERS=tsrelay-0,tsrelay-1 in a cluster, 192.0.2.10:8443,192.0.2.11:8443 outside one)")
	}
	if d.CertFile != "" {
		bad("TS_DERP_CERT_FILE cannot be used with a DERP mesh: every node of the region serves the region's shared self-signed certificate (from TS_DERP_MESH_SECRET or TS_DERP_MESH_FILE); unset TS_DERP_CERT_FILE, TS_DERP_KEY_FILE and TS_DERP_HOSTNAME")
	}
	var plan meshPlan
	seen := map[string]bool{}
	for _, e := range d.MeshPeers {
		m := meshMember{name: e}
		if inCluster {
			if !serviceNameRE.MatchString(e) {
				bad("TS_DERP_MESH_PEERS: %q is not a Service name; with TS_KUBE_SECRET want comma-separated Service names (1-63 lower-case letters, digits or '-', starting with a letter), e.g. tsrelay-0,tsrelay-1", e)
				continue
			}
		} else {
			ap, err := netip.ParseAddrPort(e)
			if err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" || ap.Addr().IsUnspecified() {
				bad("TS_DERP_MESH_PEERS: %q: want ip:port or [ipv6]:port, the address clients dial for that member's DERP (e.g. 192.0.2.10:8443)", e)
				continue
			}
			m.addr = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
			e = m.addr.String()
		}
		if seen[e] {
			bad("TS_DERP_MESH_PEERS: %s is listed twice; want each member once", m.name)
			continue
		}
		seen[e] = true
		plan.members = append(plan.members, m)
	}
	if len(d.MeshPeers) > 0 && len(d.MeshPeers) < 2 {
		bad("TS_DERP_MESH_PEERS=%s: a mesh needs at least 2 members, this relay included", strings.Join(d.MeshPeers, ","))
	}
	if len(d.MeshPeers) > 26 {
		bad("TS_DERP_MESH_PEERS: %d members, want at most 26", len(d.MeshPeers))
	}
	if err := errors.Join(errs...); err != nil {
		return meshPlan{}, err
	}
	plan.self = -1
	if inCluster {
		plan.self = slices.IndexFunc(plan.members, func(m meshMember) bool { return m.name == c.RelayService })
		if plan.self < 0 {
			return meshPlan{}, fmt.Errorf("TS_DERP_MESH_PEERS=%s does not include this relay's TS_RELAY_SERVICE=%q: list every member, this one included", strings.Join(d.MeshPeers, ","), c.RelayService)
		}
		return plan, nil
	}
	own := d.ownIPs(c)
	if len(own) == 0 {
		return meshPlan{}, errors.New("TS_DERP_MESH_PEERS: cannot tell which member is this relay: set TS_DERP_ADDRS or TS_RELAY_SERVER_STATIC_ENDPOINTS to this relay's address, whose IP is that of its TS_DERP_MESH_PEERS entry")
	}
	var byIP []int
	for i, m := range plan.members {
		if slices.Contains(own, m.addr.Addr()) {
			byIP = append(byIP, i)
		}
	}
	match := byIP
	if len(byIP) > 1 {
		match = slices.DeleteFunc(slices.Clone(byIP), func(i int) bool { return plan.members[i].addr.Port() != uint16(d.DERPPort) })
	}
	ownStr := make([]string, len(own))
	for i, a := range own {
		ownStr[i] = a.String()
	}
	switch len(match) {
	case 1:
		plan.self = match[0]
		return plan, nil
	case 0:
		if len(byIP) > 1 {
			return meshPlan{}, fmt.Errorf("TS_DERP_MESH_PEERS: several entries have this relay's IP (%s) and none has its TS_DERP_PORT=%d: cannot tell which member is this relay", strings.Join(ownStr, ","), d.DERPPort)
		}
		return meshPlan{}, fmt.Errorf("TS_DERP_MESH_PEERS=%s: no entry has one of this relay's IPs (%s, from TS_DERP_ADDRS or TS_RELAY_SERVER_STATIC_ENDPOINTS): list this relay too", strings.Join(d.MeshPeers, ","), strings.Join(ownStr, ","))
	default:
		return meshPlan{}, fmt.Errorf("TS_DERP_MESH_PEERS: several entries have this relay's IP (%s) and port TS_DERP_PORT=%d: cannot tell which member is this relay", strings.Join(ownStr, ","), d.DERPPort)
	}
}

// ownIPs are the IPs clients dial for this relay's DERP server that are
// known from the configuration alone: TS_DERP_ADDRS, else the IPs of
// TS_RELAY_SERVER_STATIC_ENDPOINTS (as dialAddrs, without a Service).
func (d DERPConfig) ownIPs(c *Config) []netip.Addr {
	if len(d.Addrs) > 0 {
		return d.Addrs
	}
	var out []netip.Addr
	for _, ap := range c.RelayServerStaticEndpoints {
		if a := ap.Addr().Unmap(); !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out
}

// loadMeshShared returns the region's shared state: from TS_DERP_MESH_FILE,
// or from TS_DERP_MESH_SECRET, which is created or completed if needed.
func loadMeshShared(ctx context.Context, d DERPConfig, kc *kubeclient.Client, now time.Time) (*derpregion.Shared, error) {
	if d.MeshFile != "" {
		sh, err := derpregion.LoadSharedFile(d.MeshFile, now)
		if err != nil {
			return nil, fmt.Errorf("TS_DERP_MESH_FILE=%s: %w", d.MeshFile, err)
		}
		return sh, nil
	}
	if kc == nil {
		return nil, fmt.Errorf("TS_DERP_MESH_SECRET=%s: no Kubernetes client", d.MeshSecret)
	}
	data, err := kubestate.EnsureSecret(ctx, kc.Dynamic, kc.Namespace, d.MeshSecret, func(have map[string][]byte) (map[string][]byte, bool, error) {
		return derpregion.CompleteShared(have, now)
	})
	if err != nil {
		return nil, fmt.Errorf("TS_DERP_MESH_SECRET: %w", err)
	}
	sh, err := derpregion.ParseShared(data, now)
	if err != nil {
		return nil, fmt.Errorf("TS_DERP_MESH_SECRET=%s: %w", d.MeshSecret, err)
	}
	return sh, nil
}

// peers are the mesh links to the members other than this relay. An
// ip:port member is dialled there; a Service member at its cluster IP and
// port derp, once svcs has seen its Service.
func (p *meshPlan) peers(svcs *meshServices) []derpregion.MeshPeer {
	var out []derpregion.MeshPeer
	for i, m := range p.members {
		if i == p.self {
			continue
		}
		addr, name := m.addr, m.name
		out = append(out, derpregion.MeshPeer{
			Name: m.name,
			Addr: func() (netip.AddrPort, bool) {
				if !addr.IsValid() {
					a := svcs.get(name).mesh
					return a, a.IsValid()
				}
				return addr, true
			},
		})
	}
	return out
}

// regionMembers are the derpMap nodes, one per member in order. An
// ip:port member is at its entry (so a forwarded port works); a Service
// member at its load-balancer IPs and Service port derp (svcs). This
// relay (self) is at TS_DERP_ADDRS when set (explicit), else at its
// Service's load-balancer IPs when known, else at its usual dial
// addresses (dial). Nil without a mesh.
func (p *meshPlan) regionMembers(explicit, dial []netip.Addr, svcs *meshServices) []derpregion.Member {
	if p == nil {
		return nil
	}
	out := make([]derpregion.Member, len(p.members))
	for i, m := range p.members {
		if m.addr.IsValid() {
			out[i] = derpregion.Member{Addrs: []netip.Addr{m.addr.Addr()}, DERPPort: int(m.addr.Port())}
		} else {
			a := svcs.get(m.name)
			out[i] = derpregion.Member{Addrs: a.lb, DERPPort: int(a.port)}
		}
		if i == p.self {
			switch {
			case len(explicit) > 0:
				out[i].Addrs = explicit
			case len(out[i].Addrs) == 0:
				out[i].Addrs = dial
			}
		}
	}
	return out
}

// meshLocation names where the region's shared state is, for logs.
func meshLocation(d DERPConfig) string {
	if d.MeshFile != "" {
		return d.MeshFile
	}
	return "secret " + d.MeshSecret
}
