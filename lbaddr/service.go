package lbaddr

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// HostPort is a load-balancer hostname and the Service port it listens on.
type HostPort struct {
	Host string
	Port uint16
}

// serviceInfo is what parseService found in a Service: the endpoints plus
// what the watcher should log about.
type serviceInfo struct {
	ips   []netip.AddrPort
	hosts []HostPort
	why   string

	// badIPs are ingress IPs that did not parse.
	badIPs []string
	// assumed describes the Service ports taken for the relay's by a
	// weaker rule than a targetPort equal to the relay's port or its name,
	// e.g. `relay 41000/UDP→tailscale (the Service port's name is the
	// relay's port name)`; "" when none was.
	assumed string
}

// notes is a key for what parseService found worth logging, so the watcher
// logs it once and again only when it changes.
func (s *serviceInfo) notes() string {
	return strings.Join(s.badIPs, ",") + "|" + s.assumed
}

// hostnames returns the distinct hostnames in s.hosts, sorted.
func (s *serviceInfo) hostnames() []string {
	var names []string
	for _, hp := range s.hosts {
		names = append(names, hp.Host)
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// parseService returns the endpoints in a Service object: every IP in
// status.loadBalancer.ingress (IPv4 and IPv6, IPv4-mapped ones unmapped,
// unparsable ones skipped) paired with every Service port that leads to the
// relay (see relayPorts), sorted and deduplicated; and the ingress hostnames
// of entries without an IP, paired the same way, for the caller to resolve.
// When both are empty, why says why in a few words; otherwise it is "". It
// also keeps what the watcher logs (badIPs, assumed). The endpoints carry the
// Service's port, which the load balancer listens on, not the targetPort.
func parseService(svc *unstructured.Unstructured, want relayTarget) serviceInfo {
	ref := svc.GetNamespace() + "/" + svc.GetName()
	var info serviceInfo
	all := servicePorts(svc)
	ports, rule := relayPorts(all, want)
	switch rule {
	case matchNone:
		info.why = fmt.Sprintf("Service %s has no port that leads to the relay: want %s; it has %s", ref, want, describePorts(all))
		return info
	case matchPortName, matchOnlyUDP:
		info.assumed = fmt.Sprintf("%s (%s)", describePorts(ports), rule)
	}
	var numbers []uint16
	for _, p := range ports {
		numbers = append(numbers, p.port)
	}
	slices.Sort(numbers)
	numbers = slices.Compact(numbers)
	in := parseIngress(svc)
	info.badIPs = in.badIPs
	for _, addr := range in.ips {
		for _, p := range numbers {
			info.ips = append(info.ips, netip.AddrPortFrom(addr, p))
		}
	}
	for _, host := range in.hosts {
		for _, p := range numbers {
			info.hosts = append(info.hosts, HostPort{Host: host, Port: p})
		}
	}
	slices.SortFunc(info.ips, netip.AddrPort.Compare)
	info.ips = slices.Compact(info.ips)
	slices.SortFunc(info.hosts, func(a, b HostPort) int {
		return cmp.Or(strings.Compare(a.Host, b.Host), cmp.Compare(a.Port, b.Port))
	})
	info.hosts = slices.Compact(info.hosts)

	if len(info.ips) == 0 && len(info.hosts) == 0 {
		typ, _, _ := unstructured.NestedString(svc.Object, "spec", "type")
		switch {
		case len(info.badIPs) > 0:
			info.why = fmt.Sprintf("Service %s has no load-balancer address it can use (unparsable IP %q)", ref, info.badIPs[0])
		case typ != "" && typ != "LoadBalancer":
			info.why = fmt.Sprintf("Service %s is of type %s, not LoadBalancer", ref, typ)
		default:
			info.why = fmt.Sprintf("Service %s has no load-balancer address yet", ref)
		}
	}
	return info
}

// ingress is what a Service's status.loadBalancer.ingress holds.
type ingress struct {
	// ips are the entries' IPs in order, IPv4-mapped ones unmapped,
	// each once.
	ips []netip.Addr
	// hosts are the hostnames of entries without an IP, in order.
	hosts []string
	// badIPs are IPs that did not parse (or carry a zone).
	badIPs []string
}

// parseIngress reads a Service's load-balancer status. An entry with both
// an IP and a hostname counts as its IP. A malformed status reads as no
// ingress.
func parseIngress(svc *unstructured.Unstructured) ingress {
	var out ingress
	for _, in := range slice(svc, "status", "loadBalancer", "ingress") {
		entry, _ := in.(map[string]any)
		ip, _ := entry["ip"].(string)
		host, _ := entry["hostname"].(string)
		switch {
		case ip != "":
			addr, err := netip.ParseAddr(ip)
			if err != nil || addr.Zone() != "" {
				out.badIPs = append(out.badIPs, ip)
				continue
			}
			if addr = addr.Unmap(); !slices.Contains(out.ips, addr) {
				out.ips = append(out.ips, addr)
			}
		case host != "":
			out.hosts = append(out.hosts, host)
		}
	}
	return out
}

// NamedPort is what a Service says about reaching its port of one name:
// through the load balancer from outside, or at the cluster IP from inside
// the cluster. Both listen on the Service port's number.
type NamedPort struct {
	// LoadBalancer are the IPs in status.loadBalancer.ingress, in order,
	// IPv4-mapped ones unmapped, each once; hostnames are not resolved.
	LoadBalancer []netip.Addr
	// Port is the number of the Service port with the name; 0 when there
	// is none.
	Port uint16
	// ClusterIP is spec.clusterIP with Port; invalid when the Service has
	// no cluster IP (headless) or no port with the name.
	ClusterIP netip.AddrPort
}

// ServicePort reads how Service svc's port named name is reached (the DERP
// mesh's members: their port named derp). It reads the ports and the
// load-balancer status as the relay's own Service is read; a nil Service
// gives the zero NamedPort.
func ServicePort(svc *unstructured.Unstructured, name string) NamedPort {
	var out NamedPort
	if svc == nil {
		return out
	}
	for _, p := range servicePorts(svc) {
		if p.name == name {
			out.Port = p.port
			break
		}
	}
	out.LoadBalancer = parseIngress(svc).ips
	v, _, _ := unstructured.NestedFieldNoCopy(svc.Object, "spec", "clusterIP")
	cip, _ := v.(string)
	if a, err := netip.ParseAddr(cip); err == nil && a.Zone() == "" && !a.IsUnspecified() && out.Port != 0 {
		out.ClusterIP = netip.AddrPortFrom(a.Unmap(), out.Port)
	}
	return out
}

// slice returns the list at path in obj, or nil if there is none. Unlike
// unstructured.NestedSlice it does not copy, so it works on objects built in
// code with Go types a JSON decoder would not produce.
func slice(obj *unstructured.Unstructured, path ...string) []any {
	v, _, _ := unstructured.NestedFieldNoCopy(obj.Object, path...)
	s, _ := v.([]any)
	return s
}

// portNumber returns v as a port number, whichever numeric type decoding the
// Service gave it.
func portNumber(v any) (uint16, bool) {
	var n int64
	switch v := v.(type) {
	case int64:
		n = v
	case int:
		n = int64(v)
	case int32:
		n = int64(v)
	case float64:
		if v != float64(int64(v)) {
			return 0, false
		}
		n = int64(v)
	default:
		return 0, false
	}
	if n < 1 || n > 65535 {
		return 0, false
	}
	return uint16(n), true
}
