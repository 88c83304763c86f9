package lbaddr

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

const testRelayPort = 61441

// newService returns a LoadBalancer Service kube-public/tsrelay with ports
// and, unless ingress is nil, a load-balancer status with ingress.
func newService(ports, ingress []any) *unstructured.Unstructured {
	svc := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1",
		"kind":       "Service",
		"metadata":   map[string]any{"namespace": "kube-public", "name": "tsrelay"},
		"spec":       map[string]any{"type": "LoadBalancer", "ports": ports},
	}}
	if ingress != nil {
		svc.Object["status"] = map[string]any{"loadBalancer": map[string]any{"ingress": ingress}}
	}
	return svc
}

// port returns a Service port; target nil leaves targetPort out.
func port(protocol string, number int64, target any) map[string]any {
	p := map[string]any{"port": number}
	if protocol != "" {
		p["protocol"] = protocol
	}
	if target != nil {
		p["targetPort"] = target
	}
	return p
}

func udp(number int64, target any) map[string]any { return port("UDP", number, target) }
func ingressIP(ip string) map[string]any          { return map[string]any{"ip": ip} }
func ingressHost(h string) map[string]any         { return map[string]any{"hostname": h} }

func addrPorts(ss ...string) []netip.AddrPort {
	var out []netip.AddrPort
	for _, s := range ss {
		out = append(out, netip.MustParseAddrPort(s))
	}
	return out
}

func TestParseService(t *testing.T) {
	relayUDP := []any{udp(41000, int64(testRelayPort))}
	tests := []struct {
		name      string
		svc       *unstructured.Unstructured
		wantIPs   []netip.AddrPort
		wantHosts []HostPort
		wantWhy   string // substring; "" means why must be empty
		// wantAssumed and wantBadIPs check what the watcher logs.
		wantAssumed string
		wantBadIPs  []string
	}{
		{
			name:    "IPv4",
			svc:     newService(relayUDP, []any{ingressIP("192.0.2.10")}),
			wantIPs: addrPorts("192.0.2.10:41000"),
		},
		{
			name:    "IPv6",
			svc:     newService(relayUDP, []any{ingressIP("2001:db8::10")}),
			wantIPs: addrPorts("[2001:db8::10]:41000"),
		},
		{
			name: "both, sorted, 4in6 unmapped, duplicates dropped",
			svc: newService(relayUDP, []any{
				ingressIP("2001:db8::10"), ingressIP("::ffff:192.0.2.10"), ingressIP("192.0.2.10"), ingressIP("192.0.2.9"),
			}),
			wantIPs: addrPorts("192.0.2.9:41000", "192.0.2.10:41000", "[2001:db8::10]:41000"),
		},
		{
			name:      "hostname only",
			svc:       newService(relayUDP, []any{ingressHost("nlb-x.elb.example")}),
			wantHosts: []HostPort{{"nlb-x.elb.example", 41000}},
		},
		{
			name: "mixed: an entry with both uses its IP",
			svc: newService(relayUDP, []any{
				ingressHost("b.example"), ingressIP("192.0.2.10"),
				map[string]any{"ip": "192.0.2.11", "hostname": "ignored.example"}, ingressHost("a.example"),
			}),
			wantIPs:   addrPorts("192.0.2.10:41000", "192.0.2.11:41000"),
			wantHosts: []HostPort{{"a.example", 41000}, {"b.example", 41000}},
		},
		{
			name: "Service port differs from targetPort",
			svc: newService([]any{
				udp(testRelayPort, int64(9999)), // the port number matches, the target does not
				udp(41000, int64(testRelayPort)),
			}, []any{ingressIP("192.0.2.10")}),
			wantIPs: addrPorts("192.0.2.10:41000"),
		},
		{
			name:    "absent targetPort defaults to port",
			svc:     newService([]any{udp(testRelayPort, nil)}, []any{ingressIP("192.0.2.10")}),
			wantIPs: addrPorts("192.0.2.10:61441"),
		},
		{
			name:    "targetPort as float (decoded without int64)",
			svc:     newService([]any{udp(41000, float64(testRelayPort))}, []any{ingressIP("192.0.2.10")}),
			wantIPs: addrPorts("192.0.2.10:41000"),
		},
		{
			name: "every matching port pairs with every IP",
			svc: newService([]any{udp(41000, int64(testRelayPort)), udp(testRelayPort, nil)},
				[]any{ingressIP("192.0.2.10"), ingressHost("nlb.example")}),
			wantIPs:   addrPorts("192.0.2.10:41000", "192.0.2.10:61441"),
			wantHosts: []HostPort{{"nlb.example", 41000}, {"nlb.example", 61441}},
		},
		{
			name:        "one named targetPort is assumed",
			svc:         newService([]any{udp(41000, "relay"), port("TCP", 80, "http")}, []any{ingressIP("192.0.2.10")}),
			wantIPs:     addrPorts("192.0.2.10:41000"),
			wantAssumed: `41000 (targetPort "relay")`,
		},
		{
			name:    "a numeric match beats a named targetPort",
			svc:     newService([]any{udp(41000, "relay"), udp(41001, int64(testRelayPort))}, []any{ingressIP("192.0.2.10")}),
			wantIPs: addrPorts("192.0.2.10:41001"),
		},
		{
			name:    "several named targetPorts are ambiguous",
			svc:     newService([]any{udp(41000, "relay"), udp(41001, "other")}, []any{ingressIP("192.0.2.10")}),
			wantWhy: "Service kube-public/tsrelay has no UDP port with targetPort 61441 and several with named targetPorts (41000→relay, 41001→other)",
		},
		{
			name: "TCP only; absent protocol is TCP",
			svc: newService([]any{port("TCP", 41000, int64(testRelayPort)), port("", testRelayPort, nil)},
				[]any{ingressIP("192.0.2.10")}),
			wantWhy: "Service kube-public/tsrelay has no UDP port with targetPort 61441",
		},
		{
			name:    "no ports",
			svc:     newService(nil, []any{ingressIP("192.0.2.10")}),
			wantWhy: "Service kube-public/tsrelay has no UDP port with targetPort 61441",
		},
		{
			name:    "no status",
			svc:     newService(relayUDP, nil),
			wantWhy: "Service kube-public/tsrelay has no load-balancer address yet",
		},
		{
			name:    "empty ingress",
			svc:     newService(relayUDP, []any{}),
			wantWhy: "Service kube-public/tsrelay has no load-balancer address yet",
		},
		{
			name:       "unparsable IP skipped",
			svc:        newService(relayUDP, []any{ingressIP("192.0.2.300"), ingressIP("192.0.2.10")}),
			wantIPs:    addrPorts("192.0.2.10:41000"),
			wantBadIPs: []string{"192.0.2.300"},
		},
		{
			name:       "only unparsable IPs",
			svc:        newService(relayUDP, []any{ingressIP("not-an-ip")}),
			wantWhy:    `Service kube-public/tsrelay has no load-balancer address it can use (unparsable IP "not-an-ip")`,
			wantBadIPs: []string{"not-an-ip"},
		},
		{
			name: "not a LoadBalancer",
			svc: func() *unstructured.Unstructured {
				svc := newService(relayUDP, nil)
				unstructured.SetNestedField(svc.Object, "ClusterIP", "spec", "type")
				return svc
			}(),
			wantWhy: "Service kube-public/tsrelay is of type ClusterIP, not LoadBalancer",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			info := parseService(tt.svc, testRelayPort)
			if !slices.Equal(info.ips, tt.wantIPs) {
				t.Errorf("parseService ips = %v, want %v", info.ips, tt.wantIPs)
			}
			if !slices.Equal(info.hosts, tt.wantHosts) {
				t.Errorf("parseService hosts = %v, want %v", info.hosts, tt.wantHosts)
			}
			if tt.wantWhy == "" && info.why != "" {
				t.Errorf("parseService why = %q, want empty", info.why)
			}
			if tt.wantWhy != "" && !strings.Contains(info.why, tt.wantWhy) {
				t.Errorf("parseService why = %q, want it to contain %q", info.why, tt.wantWhy)
			}
			if info.assumed != tt.wantAssumed {
				t.Errorf("assumed port = %q, want %q", info.assumed, tt.wantAssumed)
			}
			if !slices.Equal(info.badIPs, tt.wantBadIPs) {
				t.Errorf("bad IPs = %q, want %q", info.badIPs, tt.wantBadIPs)
			}
		})
	}
}
