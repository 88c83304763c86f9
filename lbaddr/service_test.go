package lbaddr

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

const testRelayPort = 61441

// testTarget is the relay's port as the manifests name it.
var testTarget = relayTarget{number: testRelayPort, name: "relay"}

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
			name:    "no ports",
			svc:     newService(nil, []any{ingressIP("192.0.2.10")}),
			wantWhy: `Service kube-public/tsrelay has no port that leads to the relay: want a UDP port with targetPort 61441 or "relay", or named "relay"; it has no ports`,
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
			info := parseService(tt.svc, testTarget)
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

// named returns a UDP Service port with a name.
func named(name string, number int64, target any) map[string]any {
	p := udp(number, target)
	p["name"] = name
	return p
}

// TestRelayPortRules checks which Service ports are taken for the relay's,
// and what readiness says when none is, for Services as the examples
// render them and as users write them.
func TestRelayPortRules(t *testing.T) {
	derpPorts := []any{ // examples/derp's Service: DERP and STUN next to the relay
		named("relay", testRelayPort, "relay"),
		map[string]any{"name": "derp", "port": int64(8443), "targetPort": "derp", "protocol": "TCP"},
		named("stun", 3478, "stun"),
	}
	many := []any{}
	for i := range 10 {
		many = append(many, named(fmt.Sprintf("p%d", i), int64(5000+i), fmt.Sprintf("p%d", i)))
	}
	tests := []struct {
		name        string
		ports       []any
		target      relayTarget
		want        []uint16 // the Service ports that lead to the relay
		wantAssumed string
		wantWhy     string // exactly; "" when want is not empty
	}{
		{
			name:  "examples/derp: targetPort relay among several named ones",
			ports: derpPorts, target: testTarget, want: []uint16{testRelayPort},
		},
		{
			name:  "numeric targetPort",
			ports: []any{udp(41000, int64(testRelayPort)), named("stun", 3478, "stun")}, target: testTarget, want: []uint16{41000},
		},
		{
			name:  "absent targetPort is the port",
			ports: []any{udp(testRelayPort, nil), named("stun", 3478, "stun")}, target: testTarget, want: []uint16{testRelayPort},
		},
		{
			name:  "a numeric match beats a named one",
			ports: []any{udp(41000, "relay"), udp(41001, int64(testRelayPort))}, target: testTarget, want: []uint16{41001},
		},
		{
			name:  "the targetPort name beats the port's name",
			ports: []any{named("relay", 41000, "ts"), udp(41001, "relay")}, target: testTarget, want: []uint16{41001},
		},
		{
			name:  "every port by the deciding rule counts",
			ports: []any{udp(41000, "relay"), named("relay", 41001, "relay")}, target: testTarget, want: []uint16{41000, 41001},
		},
		{
			name:  "another container port name, set",
			ports: []any{named("udp", 41641, "ts-relay"), named("stun", 3478, "stun")}, target: relayTarget{testRelayPort, "ts-relay"},
			want: []uint16{41641},
		},
		{
			name:        "the Service port's name, with a named targetPort, is assumed",
			ports:       []any{named("relay", 41641, "tailscale"), named("stun", 3478, "stun")},
			target:      testTarget,
			want:        []uint16{41641},
			wantAssumed: "relay 41641/UDP→tailscale (the Service port's name is the relay's port name)",
		},
		{
			name:        "the only UDP port, with a named targetPort, is assumed",
			ports:       []any{named("wg", 41641, "tailscale"), port("TCP", 80, "http")},
			target:      testTarget,
			want:        []uint16{41641},
			wantAssumed: "wg 41641/UDP→tailscale (the Service's only UDP port, with a named targetPort)",
		},
		{
			name:    "the only UDP port with another number is not the relay's",
			ports:   []any{named("wg", 41641, int64(41641))},
			target:  testTarget,
			wantWhy: `Service kube-public/tsrelay has no port that leads to the relay: want a UDP port with targetPort 61441 or "relay", or named "relay"; it has wg 41641/UDP→41641`,
		},
		{
			name:    "no name to match: examples/derp is ambiguous",
			ports:   derpPorts,
			target:  relayTarget{number: testRelayPort},
			wantWhy: "Service kube-public/tsrelay has no port that leads to the relay: want a UDP port with targetPort 61441; it has relay 61441/UDP→relay, derp 8443/TCP→derp, stun 3478/UDP→stun",
		},
		{
			name:    "several named targetPorts, none the relay's",
			ports:   []any{named("a", 41000, "one"), named("b", 41001, "other")},
			target:  testTarget,
			wantWhy: `Service kube-public/tsrelay has no port that leads to the relay: want a UDP port with targetPort 61441 or "relay", or named "relay"; it has a 41000/UDP→one, b 41001/UDP→other`,
		},
		{
			name:    "TCP only; absent protocol is TCP",
			ports:   []any{port("TCP", 41000, int64(testRelayPort)), port("", testRelayPort, "relay")},
			target:  testTarget,
			wantWhy: `Service kube-public/tsrelay has no port that leads to the relay: want a UDP port with targetPort 61441 or "relay", or named "relay"; it has 41000/TCP→61441, 61441/TCP→relay`,
		},
		{
			name:    "malformed entries are left out",
			ports:   []any{udp(41000, 1.5), udp(0, int64(testRelayPort)), "junk"},
			target:  testTarget,
			wantWhy: `Service kube-public/tsrelay has no port that leads to the relay: want a UDP port with targetPort 61441 or "relay", or named "relay"; it has no ports`,
		},
		{
			name:    "a long list is cut",
			ports:   many,
			target:  testTarget,
			wantWhy: `Service kube-public/tsrelay has no port that leads to the relay: want a UDP port with targetPort 61441 or "relay", or named "relay"; it has p0 5000/UDP→p0, p1 5001/UDP→p1, p2 5002/UDP→p2, p3 5003/UDP→p3, p4 5004/UDP→p4, p5 5005/UDP→p5, p6 5006/UDP→p6, p7 5007/UDP→p7, and 2 more`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			info := parseService(newService(tt.ports, []any{ingressIP("192.0.2.10")}), tt.target)
			var got []uint16
			for _, ap := range info.ips {
				got = append(got, ap.Port())
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("parseService ports = %v, want %v (why %q)", got, tt.want, info.why)
			}
			if info.why != tt.wantWhy {
				t.Errorf("parseService why = %q, want %q", info.why, tt.wantWhy)
			}
			if info.assumed != tt.wantAssumed {
				t.Errorf("parseService assumed = %q, want %q", info.assumed, tt.wantAssumed)
			}
		})
	}
}

func TestServicePort(t *testing.T) {
	named := func(name string, number any) map[string]any {
		return map[string]any{"name": name, "port": number, "protocol": "TCP"}
	}
	withClusterIP := func(svc *unstructured.Unstructured, ip string) *unstructured.Unstructured {
		svc.Object["spec"].(map[string]any)["clusterIP"] = ip
		return svc
	}
	for _, tc := range []struct {
		name string
		svc  *unstructured.Unstructured
		want string // LoadBalancer|Port|ClusterIP
	}{
		{"nil Service", nil, "[]|0|invalid AddrPort"},
		{"a member", withClusterIP(newService([]any{port("UDP", 41000, int64(40000)), named("derp", int64(18443))},
			[]any{map[string]any{"ip": "192.0.2.20"}, map[string]any{"ip": "2001:db8::20"}}), "10.96.0.7"),
			"[192.0.2.20 2001:db8::20]|18443|10.96.0.7:18443"},
		{"no load balancer yet", withClusterIP(newService([]any{named("derp", int64(18443))}, nil), "10.96.0.7"),
			"[]|18443|10.96.0.7:18443"},
		{"no port named derp", withClusterIP(newService([]any{port("UDP", 41000, nil)},
			[]any{map[string]any{"ip": "192.0.2.20"}}), "10.96.0.7"),
			"[192.0.2.20]|0|invalid AddrPort"},
		{"headless", withClusterIP(newService([]any{named("derp", int64(18443))}, nil), "None"),
			"[]|18443|invalid AddrPort"},
		{"JSON numbers", withClusterIP(newService([]any{named("derp", float64(18443))}, nil), "::ffff:10.96.0.7"),
			"[]|18443|10.96.0.7:18443"},
		{"port out of range or not whole", newService([]any{named("derp", int64(70000)), named("derp", 1.5)}, nil),
			"[]|0|invalid AddrPort"},
		{"ingress: mapped, repeated, zoned, hostname", newService([]any{named("derp", int64(8443))}, []any{
			map[string]any{"ip": "::ffff:192.0.2.20"}, map[string]any{"ip": "192.0.2.20"},
			map[string]any{"ip": "fe80::1%eth0"}, map[string]any{"hostname": "lb.example.com"},
		}), "[192.0.2.20]|8443|invalid AddrPort"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := ServicePort(tc.svc, "derp")
			got := fmt.Sprintf("%v|%d|%v", p.LoadBalancer, p.Port, p.ClusterIP)
			if got != tc.want {
				t.Errorf("ServicePort = %s, want %s", got, tc.want)
			}
		})
	}
}
