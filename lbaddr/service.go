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
	// assumed describes the Service port with a named targetPort that was
	// assumed to be the relay's, e.g. `41000 (targetPort "relay")`; "" when
	// none was.
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

// namedPort is a UDP Service port whose targetPort is a name.
type namedPort struct {
	port   uint16
	target string
}

// parseService returns the endpoints in a Service object: every IP in
// status.loadBalancer.ingress (IPv4 and IPv6, IPv4-mapped ones unmapped,
// unparsable ones skipped) paired with every Service port that leads to
// relayPort, sorted and deduplicated; and the ingress hostnames of entries
// without an IP, paired the same way, for the caller to resolve. When both are
// empty, why says why in a few words; otherwise it is "". It also keeps
// what the watcher logs (badIPs, assumed).
//
// A Service port leads to relayPort when its protocol is UDP (absent means
// TCP, as the API server defaults it) and its targetPort is relayPort, or is
// absent and its port is relayPort (targetPort defaults to port). A
// targetPort given by name cannot be resolved without reading the Pod: when no
// port matches by number and exactly one UDP port has a named targetPort, that
// one is assumed to be the relay's. The endpoints carry the Service's port,
// which the load balancer listens on, not the targetPort.
func parseService(svc *unstructured.Unstructured, relayPort uint16) serviceInfo {
	ref := svc.GetNamespace() + "/" + svc.GetName()
	var info serviceInfo
	ports, named := servicePorts(svc, relayPort)
	if len(ports) == 0 {
		switch len(named) {
		case 0:
			info.why = fmt.Sprintf("Service %s has no UDP port with targetPort %d", ref, relayPort)
			return info
		case 1:
			ports = []uint16{named[0].port}
			info.assumed = fmt.Sprintf("%d (targetPort %q)", named[0].port, named[0].target)
		default:
			var names []string
			for _, n := range named {
				names = append(names, fmt.Sprintf("%d→%s", n.port, n.target))
			}
			info.why = fmt.Sprintf("Service %s has no UDP port with targetPort %d and several with named targetPorts (%s)",
				ref, relayPort, strings.Join(names, ", "))
			return info
		}
	}

	// A malformed status reads as no ingress; the why text then says so.
	ingress := slice(svc, "status", "loadBalancer", "ingress")
	for _, in := range ingress {
		entry, _ := in.(map[string]any)
		ip, _ := entry["ip"].(string)
		host, _ := entry["hostname"].(string)
		switch {
		case ip != "":
			addr, err := netip.ParseAddr(ip)
			if err != nil || addr.Zone() != "" {
				info.badIPs = append(info.badIPs, ip)
				continue
			}
			for _, p := range ports {
				info.ips = append(info.ips, netip.AddrPortFrom(addr.Unmap(), p))
			}
		case host != "":
			for _, p := range ports {
				info.hosts = append(info.hosts, HostPort{Host: host, Port: p})
			}
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

// servicePorts returns the UDP Service ports whose targetPort is relayPort by
// number, sorted, and the UDP ports whose targetPort is a name.
func servicePorts(svc *unstructured.Unstructured, relayPort uint16) (ports []uint16, named []namedPort) {
	// A malformed spec reads as no ports; the why text then says so.
	specPorts := slice(svc, "spec", "ports")
	for _, sp := range specPorts {
		p, _ := sp.(map[string]any)
		// The API server defaults an absent protocol to TCP.
		if proto, _ := p["protocol"].(string); proto != "UDP" {
			continue
		}
		port, ok := portNumber(p["port"])
		if !ok {
			continue
		}
		target := p["targetPort"]
		if target == nil {
			target = int64(port) // targetPort defaults to port
		}
		if name, ok := target.(string); ok {
			named = append(named, namedPort{port: port, target: name})
			continue
		}
		if n, ok := portNumber(target); ok && n == relayPort {
			ports = append(ports, port)
		}
	}
	slices.Sort(ports)
	return slices.Compact(ports), named
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
