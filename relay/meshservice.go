package relay

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"sync"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/lbaddr"
)

// meshServicePort is the name of the Service port that leads to a
// member's DERP server (manifests/components/derp names it so).
const meshServicePort = "derp"

// memberAddrs is what a member's Service says about how to reach it.
type memberAddrs struct {
	// lb are the load-balancer IPs: where clients dial it (derpMap).
	lb []netip.Addr
	// port is the Service port named derp, which both the load balancer
	// and the cluster IP listen on; 0 if there is none.
	port uint16
	// mesh is the cluster IP with port: where the other members dial it,
	// inside the cluster (not through the load balancer).
	mesh netip.AddrPort
}

// parseMemberService reads a member's Service: its load-balancer IPs,
// spec.clusterIP and the port named derp. A nil Service gives nothing.
func parseMemberService(svc *unstructured.Unstructured) memberAddrs {
	var m memberAddrs
	if svc == nil {
		return m
	}
	ports, _, _ := unstructured.NestedSlice(svc.Object, "spec", "ports")
	for _, p := range ports {
		pm, _ := p.(map[string]any)
		if name, _ := pm["name"].(string); name != meshServicePort {
			continue
		}
		switch n := pm["port"].(type) {
		case int64:
			if n > 0 && n < 65536 {
				m.port = uint16(n)
			}
		case float64:
			if n > 0 && n < 65536 {
				m.port = uint16(n)
			}
		}
	}
	ingress, _, _ := unstructured.NestedSlice(svc.Object, "status", "loadBalancer", "ingress")
	for _, in := range ingress {
		entry, _ := in.(map[string]any)
		ip, _ := entry["ip"].(string)
		if a, err := netip.ParseAddr(ip); err == nil && a.Zone() == "" && !slices.Contains(m.lb, a.Unmap()) {
			m.lb = append(m.lb, a.Unmap())
		}
	}
	cip, _, _ := unstructured.NestedString(svc.Object, "spec", "clusterIP")
	if a, err := netip.ParseAddr(cip); err == nil && m.port != 0 {
		m.mesh = netip.AddrPortFrom(a.Unmap(), m.port)
	}
	return m
}

// meshServices follows the Services of the mesh members named by Service,
// and pokes changed when what they say changes.
type meshServices struct {
	followers map[string]*lbaddr.ServiceFollower
	changed   chan struct{}

	mu    sync.Mutex
	addrs map[string]memberAddrs
}

// newMeshServices returns the followers of plan's Service members, or nil
// when the members are ip:port entries.
func newMeshServices(plan *meshPlan, kc *kubeclient.Client, logger *slog.Logger) *meshServices {
	if plan == nil || kc == nil || plan.members[0].addr.IsValid() {
		return nil
	}
	s := &meshServices{followers: map[string]*lbaddr.ServiceFollower{}, changed: make(chan struct{}, 1), addrs: map[string]memberAddrs{}}
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
		m := parseMemberService(f.Current())
		old := s.addrs[name]
		if !slices.Equal(old.lb, m.lb) || old.port != m.port || old.mesh != m.mesh {
			changed = true
		}
		s.addrs[name] = m
	}
	return changed
}

// get returns what member name's Service said last.
func (s *meshServices) get(name string) memberAddrs {
	if s == nil {
		return memberAddrs{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addrs[name]
}
