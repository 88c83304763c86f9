package lbaddr

import (
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// FuzzParseService reads Services as the API server may send them, whoever
// edited the Service (or its status): parseService must never panic, and
// every address it returns must carry a port.
func FuzzParseService(f *testing.F) {
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"r","namespace":"n"},"spec":{"type":"LoadBalancer","ports":[{"protocol":"UDP","port":41641,"targetPort":41641}]},"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.7"},{"hostname":"lb.example.com"}]}}}`), uint16(41641))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"r"},"spec":{"ports":[{"protocol":"UDP","port":443,"targetPort":"relay"}]},"status":{"loadBalancer":{"ingress":[{"ip":"fe80::1%eth0"},{"ip":"::ffff:1.2.3.4"}]}}}`), uint16(7))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"r"},"spec":{"ports":[{"protocol":"UDP","port":70000,"targetPort":-1},{"port":"x"}]},"status":{"loadBalancer":{"ingress":"nope"}}}`), uint16(0))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"r"},"spec":[],"status":{"loadBalancer":{"ingress":[1,null,{"ip":3}]}}}`), uint16(1))
	f.Fuzz(func(t *testing.T, body []byte, relayPort uint16) {
		var svc unstructured.Unstructured
		if err := svc.UnmarshalJSON(body); err != nil {
			return
		}
		info := parseService(&svc, relayTarget{number: relayPort, name: "relay"})
		for _, ap := range info.ips {
			if !ap.IsValid() || ap.Port() == 0 || ap.Addr().Zone() != "" {
				t.Fatalf("parseService gave endpoint %v", ap)
			}
		}
		if len(info.ips) == 0 && len(info.hosts) == 0 && info.why == "" {
			t.Fatalf("no endpoints and no reason for %s", body)
		}
	})
}

// FuzzServicePort reads mesh members' Services as the API server may send
// them: ServicePort must never panic, and what it returns must be usable
// (a port in range, addresses without zones).
func FuzzServicePort(f *testing.F) {
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"m"},"spec":{"clusterIP":"10.0.0.7","ports":[{"name":"derp","port":8443}]},"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.9"}]}}}`))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"m"},"spec":{"clusterIP":"None","ports":[{"name":"derp","port":70000},{"name":"derp","port":-1.5}]},"status":{"loadBalancer":{"ingress":[{"ip":"fe80::1%eth0"},{"ip":"::ffff:10.0.0.1"}]}}}`))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"m"},"spec":{"clusterIP":"fe80::1%eth0","ports":[{"name":"derp","port":8443}]}}`))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"m"},"spec":{"ports":"x"},"status":[]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		var svc unstructured.Unstructured
		if err := svc.UnmarshalJSON(body); err != nil {
			return
		}
		p := ServicePort(&svc, "derp")
		for _, a := range p.LoadBalancer {
			if !a.IsValid() || a.Zone() != "" || a.Is4In6() {
				t.Fatalf("load-balancer address %v from %s", a, body)
			}
		}
		if p.ClusterIP.IsValid() && (p.ClusterIP.Port() == 0 || p.ClusterIP.Port() != p.Port || p.ClusterIP.Addr().Zone() != "") {
			t.Fatalf("cluster address %v (port %d) from %s", p.ClusterIP, p.Port, body)
		}
	})
}
