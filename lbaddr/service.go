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
			for _, p := range numbers {
				info.ips = append(info.ips, netip.AddrPortFrom(addr.Unmap(), p))
			}
		case host != "":
			for _, p := range numbers {
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
