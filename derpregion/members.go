package derpregion

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/kubestate"
	"github.com/tsrelay/tsrelay/lbaddr"
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

// planMesh checks the mesh settings and returns the members with this
// relay identified. Outside a cluster this relay is the ip:port entry whose
// IP is one of its own DERP addresses (TS_DERP_ADDRS, else the IPs of
// TS_RELAY_SERVER_STATIC_ENDPOINTS), and among several with that IP the one
// whose port is TS_DERP_PORT (several relays on one machine listen on
// distinct ports). In a cluster it is the entry equal to TS_RELAY_SERVICE.
func (c Config) planMesh(h Host) (*meshPlan, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch {
	case c.MeshSecret != "" && c.MeshFile != "":
		bad("TS_DERP_MESH_SECRET and TS_DERP_MESH_FILE are both set: want one, the Secret with TS_KUBE_SECRET or the file without it")
	case c.MeshSecret != "" && !h.InCluster:
		bad("TS_DERP_MESH_SECRET=%s needs TS_KUBE_SECRET (the relay's state in a Secret); outside a cluster use TS_DERP_MESH_FILE=<path>", c.MeshSecret)
	case c.MeshFile != "" && h.InCluster:
		bad("TS_DERP_MESH_FILE=%s is for relays outside a cluster, but TS_KUBE_SECRET is set: use TS_DERP_MESH_SECRET=<Secret name>", c.MeshFile)
	case c.MeshSecret == "" && c.MeshFile == "":
		bad("TS_DERP_MESH_PEERS needs the region's shared state: TS_DERP_MESH_SECRET=<Secret name> with TS_KUBE_SECRET, or TS_DERP_MESH_FILE=<path> without it")
	}
	if c.MeshSecret != "" && !isObjectName(c.MeshSecret) {
		bad("TS_DERP_MESH_SECRET=%s: want a Kubernetes object name (lower-case letters, digits, '-' and '.')", c.MeshSecret)
	}
	if (c.MeshSecret != "" || c.MeshFile != "") && len(c.MeshPeers) == 0 {
		bad("TS_DERP_MESH_SECRET or TS_DERP_MESH_FILE needs TS_DERP_MESH_PEERS: the region's members, this relay included (e.g. TS_DERP_MESH_PEERS=tsrelay-0,tsrelay-1 in a cluster, 192.0.2.10:8443,192.0.2.11:8443 outside one)")
	}
	if c.CertFile != "" {
		bad("TS_DERP_CERT_FILE cannot be used with a DERP mesh: every node of the region serves the region's shared self-signed certificate (from TS_DERP_MESH_SECRET or TS_DERP_MESH_FILE); unset TS_DERP_CERT_FILE, TS_DERP_KEY_FILE and TS_DERP_HOSTNAME")
	}
	plan := &meshPlan{self: -1}
	seen := map[string]bool{}
	for _, e := range c.MeshPeers {
		m := meshMember{name: e}
		if h.InCluster {
			if !isServiceName(e) {
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
	if len(c.MeshPeers) > 0 && len(c.MeshPeers) < 2 {
		bad("TS_DERP_MESH_PEERS=%s: a mesh needs at least 2 members, this relay included", strings.Join(c.MeshPeers, ","))
	}
	if len(c.MeshPeers) > 26 {
		bad("TS_DERP_MESH_PEERS: %d members, want at most 26", len(c.MeshPeers))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if h.InCluster {
		plan.self = slices.IndexFunc(plan.members, func(m meshMember) bool { return m.name == h.Service })
		if plan.self < 0 {
			return nil, fmt.Errorf("TS_DERP_MESH_PEERS=%s does not include this relay's TS_RELAY_SERVICE=%q: list every member, this one included", strings.Join(c.MeshPeers, ","), h.Service)
		}
		return plan, nil
	}
	own := c.dialIPs(h.StaticEndpoints)
	if len(own) == 0 {
		return nil, errors.New("TS_DERP_MESH_PEERS: cannot tell which member is this relay: set TS_DERP_ADDRS or TS_RELAY_SERVER_STATIC_ENDPOINTS to this relay's address, whose IP is that of its TS_DERP_MESH_PEERS entry")
	}
	var byIP []int
	for i, m := range plan.members {
		if slices.Contains(own, m.addr.Addr()) {
			byIP = append(byIP, i)
		}
	}
	match := byIP
	if len(byIP) > 1 {
		match = slices.DeleteFunc(slices.Clone(byIP), func(i int) bool { return plan.members[i].addr.Port() != uint16(c.DERPPort) })
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
			return nil, fmt.Errorf("TS_DERP_MESH_PEERS: several entries have this relay's IP (%s) and none has its TS_DERP_PORT=%d: cannot tell which member is this relay", strings.Join(ownStr, ","), c.DERPPort)
		}
		return nil, fmt.Errorf("TS_DERP_MESH_PEERS=%s: no entry has one of this relay's IPs (%s, from TS_DERP_ADDRS or TS_RELAY_SERVER_STATIC_ENDPOINTS): list this relay too", strings.Join(c.MeshPeers, ","), strings.Join(ownStr, ","))
	default:
		return nil, fmt.Errorf("TS_DERP_MESH_PEERS: several entries have this relay's IP (%s) and port TS_DERP_PORT=%d: cannot tell which member is this relay", strings.Join(ownStr, ","), c.DERPPort)
	}
}

// meshLocation names where the region's shared state is, for logs.
func (c Config) meshLocation() string {
	if c.MeshFile != "" {
		return c.MeshFile
	}
	return "secret " + c.MeshSecret
}

// loadMeshShared returns the region's shared state: from TS_DERP_MESH_FILE,
// or from TS_DERP_MESH_SECRET, which is created or completed if needed.
func (c Config) loadMeshShared(ctx context.Context, kc *kubeclient.Client, now time.Time) (*Shared, error) {
	if c.MeshFile != "" {
		sh, err := LoadSharedFile(c.MeshFile, now)
		if err != nil {
			return nil, fmt.Errorf("TS_DERP_MESH_FILE=%s: %w", c.MeshFile, err)
		}
		return sh, nil
	}
	if kc == nil {
		return nil, fmt.Errorf("TS_DERP_MESH_SECRET=%s: no Kubernetes client", c.MeshSecret)
	}
	data, err := kubestate.EnsureSecret(ctx, kc.Dynamic, kc.Namespace, c.MeshSecret, func(have map[string][]byte) (map[string][]byte, bool, error) {
		return CompleteShared(have, now)
	})
	if err != nil {
		return nil, fmt.Errorf("TS_DERP_MESH_SECRET: %w", err)
	}
	sh, err := ParseShared(data, now)
	if err != nil {
		return nil, fmt.Errorf("TS_DERP_MESH_SECRET=%s: %w", c.MeshSecret, err)
	}
	return sh, nil
}

// peers are the mesh links to the members other than this relay. An
// ip:port member is dialled there; a Service member at its cluster IP and
// port derp, once svcs has seen its Service.
func (p *meshPlan) peers(svcs *meshServices) []MeshPeer {
	var out []MeshPeer
	for i, m := range p.members {
		if i == p.self {
			continue
		}
		addr, name := m.addr, m.name
		out = append(out, MeshPeer{
			Name: m.name,
			Addr: func() (netip.AddrPort, bool) {
				if !addr.IsValid() {
					a := svcs.get(name).ClusterIP
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
func (p *meshPlan) regionMembers(explicit, dial []netip.Addr, svcs *meshServices) []Member {
	if p == nil {
		return nil
	}
	out := make([]Member, len(p.members))
	for i, m := range p.members {
		if m.addr.IsValid() {
			out[i] = Member{Addrs: []netip.Addr{m.addr.Addr()}, DERPPort: int(m.addr.Port())}
		} else {
			a := svcs.get(m.name)
			out[i] = Member{Addrs: a.LoadBalancer, DERPPort: int(a.Port)}
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

// meshServicePort is the name of the Service port that leads to a
// member's DERP server (manifests/components/derp names it so).
const meshServicePort = "derp"

// meshServices follows the Services of the mesh members named by Service,
// and pokes changed when what they say changes.
type meshServices struct {
	followers map[string]*lbaddr.ServiceFollower
	changed   chan struct{}

	mu    sync.Mutex
	addrs map[string]lbaddr.NamedPort
}

// newMeshServices returns the followers of plan's Service members, or nil
// when the members are ip:port entries.
func newMeshServices(plan *meshPlan, kc *kubeclient.Client, logger *slog.Logger) *meshServices {
	if plan == nil || kc == nil || plan.members[0].addr.IsValid() {
		return nil
	}
	s := &meshServices{followers: map[string]*lbaddr.ServiceFollower{}, changed: make(chan struct{}, 1), addrs: map[string]lbaddr.NamedPort{}}
	for _, m := range plan.members {
		s.followers[m.name] = lbaddr.FollowService(kc.Dynamic, kc.Namespace, m.name, logger.With("src", "mesh", "service", m.name), s.changed)
	}
	return s
}

// run follows the Services until ctx is done.
func (s *meshServices) run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, f := range s.followers {
		wg.Go(func() { f.Run(ctx) })
	}
	wg.Wait()
}

// refresh reads every Service's latest copy and reports whether anything
// changed.
func (s *meshServices) refresh() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	for name, f := range s.followers {
		m := lbaddr.ServicePort(f.Current(), meshServicePort)
		old := s.addrs[name]
		if !slices.Equal(old.LoadBalancer, m.LoadBalancer) || old.Port != m.Port || old.ClusterIP != m.ClusterIP {
			changed = true
		}
		s.addrs[name] = m
	}
	return changed
}

// get returns what member name's Service said last.
func (s *meshServices) get(name string) lbaddr.NamedPort {
	if s == nil {
		return lbaddr.NamedPort{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addrs[name]
}
