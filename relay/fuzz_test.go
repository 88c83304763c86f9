package relay

import (
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// FuzzParseMemberService reads mesh members' Services as the API server may
// send them: parseMemberService must never panic, and what it returns must
// be usable (a port in range, addresses without zones).
func FuzzParseMemberService(f *testing.F) {
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"m"},"spec":{"clusterIP":"10.0.0.7","ports":[{"name":"derp","port":8443}]},"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.9"}]}}}`))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"m"},"spec":{"clusterIP":"None","ports":[{"name":"derp","port":70000},{"name":"derp","port":-1.5}]},"status":{"loadBalancer":{"ingress":[{"ip":"fe80::1%eth0"},{"ip":"::ffff:10.0.0.1"}]}}}`))
	f.Add([]byte(`{"apiVersion":"v1","kind":"Service","metadata":{"name":"m"},"spec":{"ports":"x"},"status":[]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		var svc unstructured.Unstructured
		if err := svc.UnmarshalJSON(body); err != nil {
			return
		}
		m := parseMemberService(&svc)
		for _, a := range m.lb {
			if !a.IsValid() || a.Zone() != "" {
				t.Fatalf("load-balancer address %v from %s", a, body)
			}
		}
		if m.mesh.IsValid() && (m.mesh.Port() == 0 || m.mesh.Addr().Zone() != "") {
			t.Fatalf("mesh address %v from %s", m.mesh, body)
		}
	})
}
