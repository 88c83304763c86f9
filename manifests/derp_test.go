package manifests_test

import (
	"strconv"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// TestDERPComponent renders examples/derp (the manifests plus
// components/derp) and checks that the DERP and STUN ports line up: the
// relay's TS_DERP_PORT and TS_STUN_PORT are its container ports, and the
// Service exposes each on the same number (the derpMap names the
// environment's ports) with the right protocol, next to the unchanged relay
// port. Then the real API server accepts the result: a LoadBalancer mixing
// TCP and UDP, and a pod still at PodSecurity level restricted.
func TestDERPComponent(t *testing.T) {
	objs := kubetest.KustomizeObjectsForTest(t, "..", "../examples/derp")
	var dep, svc *unstructured.Unstructured
	for _, o := range objs {
		switch o.GetKind() + "/" + o.GetName() {
		case "Deployment/tsrelay":
			dep = o
		case "Service/tsrelay":
			svc = o
		}
	}
	if dep == nil || svc == nil {
		t.Fatalf("rendered objects lack the Deployment or the Service")
	}

	pod := podFromDeployment(t, []*unstructured.Unstructured{dep})
	c := pod.Spec.Containers[0]
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	type port struct {
		number   int64
		protocol string
	}
	containerPorts := map[string]port{}
	for _, p := range c.Ports {
		containerPorts[p.Name] = port{int64(p.ContainerPort), string(p.Protocol)}
	}
	servicePorts := map[string]port{} // by targetPort name
	ports, _, _ := unstructured.NestedSlice(svc.Object, "spec", "ports")
	for _, p := range ports {
		p := p.(map[string]any)
		n, _ := p["port"].(int64)
		if f, ok := p["port"].(float64); ok {
			n = int64(f)
		}
		servicePorts[p["targetPort"].(string)] = port{n, p["protocol"].(string)}
	}
	for _, tc := range []struct{ env, name, protocol string }{
		{"TS_DERP_PORT", "derp", "TCP"},
		{"TS_STUN_PORT", "stun", "UDP"},
		{"TS_RELAY_SERVER_PORT", "relay", "UDP"},
	} {
		cp, sp := containerPorts[tc.name], servicePorts[tc.name]
		if env[tc.env] == "" || env[tc.env] != strconv.FormatInt(cp.number, 10) || cp.protocol != tc.protocol {
			t.Errorf("%s=%q, container port %s = %+v; want them equal, %s", tc.env, env[tc.env], tc.name, cp, tc.protocol)
		}
		if sp != cp {
			t.Errorf("Service port for %s = %+v, want %+v: clients dial the number the derpMap gives", tc.name, sp, cp)
		}
	}
	if ann := svc.GetAnnotations()["metallb.io/loadBalancerIPs"]; ann == "" {
		t.Errorf("examples/derp gives the Service no MetalLB address")
	}

	if testing.Short() {
		return
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	ctx := t.Context()
	enforceRestricted(t, admin)
	if err := kubetest.Apply(ctx, srv.Admin, objs, metav1.ApplyOptions{FieldManager: "kubectl"}); err != nil {
		t.Fatalf("apply examples/derp: %v", err)
	}
	if _, err := admin.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
		t.Fatalf("the relay's pod with DERP ports is not admitted at PodSecurity level restricted: %v", err)
	}
	got, err := admin.CoreV1().Services(namespace).Get(ctx, "tsrelay", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var protos []string
	for _, p := range got.Spec.Ports {
		protos = append(protos, p.Name+"/"+string(p.Protocol))
	}
	if s := strings.Join(protos, ","); !strings.Contains(s, "derp/TCP") || !strings.Contains(s, "stun/UDP") || !strings.Contains(s, "relay/UDP") {
		t.Errorf("stored Service ports %s, want derp/TCP, stun/UDP and relay/UDP on one Service", s)
	}
}
