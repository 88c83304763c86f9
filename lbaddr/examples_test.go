package lbaddr

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// defaultRelayPortName is TS_RELAY_SERVICE_PORT_NAME's default in relay's
// Config: the manifests must name the relay's container port so.
const defaultRelayPortName = "relay"

// renderedRelay is what a shipped kustomization says about one relay: its
// Service as rendered and the relay's port as its pod has it.
type renderedRelay struct {
	svc      *corev1.Service
	port     uint16 // TS_RELAY_SERVER_PORT
	portName string // the container port's name with that number
}

// renderRelay renders the kustomization in dir with the project's kustomize
// and returns the Service named svcName and the relay's port from the
// Deployment or StatefulSet; in pod tsrelay-N, $(POD_NAME) in
// TS_RELAY_SERVICE is that Service's name.
func renderRelay(t *testing.T, dir, svcName string) renderedRelay {
	t.Helper()
	objs := kubetest.KustomizeObjectsForTest(t, "..", dir)
	var r renderedRelay
	var pod *corev1.PodTemplateSpec
	conv := func(o *unstructured.Unstructured, into any) {
		t.Helper()
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, into); err != nil {
			t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}
	for _, o := range objs {
		switch {
		case o.GetKind() == "Service" && o.GetName() == svcName:
			r.svc = &corev1.Service{}
			conv(o, r.svc)
		case o.GetKind() == "Deployment":
			var d appsv1.Deployment
			conv(o, &d)
			pod = &d.Spec.Template
		case o.GetKind() == "StatefulSet":
			var s appsv1.StatefulSet
			conv(o, &s)
			pod = &s.Spec.Template
		}
	}
	if r.svc == nil || pod == nil || len(pod.Spec.Containers) != 1 {
		t.Fatalf("%s renders no Service %s, or no one-container Deployment or StatefulSet", dir, svcName)
	}
	c := pod.Spec.Containers[0]
	for _, e := range c.Env {
		if e.Name == "TS_RELAY_SERVER_PORT" {
			n, err := strconv.ParseUint(e.Value, 10, 16)
			if err != nil {
				t.Fatalf("%s: TS_RELAY_SERVER_PORT=%q: %v", dir, e.Value, err)
			}
			r.port = uint16(n)
		}
		if e.Name == "TS_RELAY_SERVICE_PORT_NAME" {
			t.Fatalf("%s sets TS_RELAY_SERVICE_PORT_NAME; the test assumes its default", dir)
		}
	}
	for _, p := range c.Ports {
		if p.ContainerPort == int32(r.port) && p.Protocol == corev1.ProtocolUDP {
			r.portName = p.Name
		}
	}
	if r.port == 0 {
		t.Fatalf("%s: no TS_RELAY_SERVER_PORT", dir)
	}
	return r
}

// TestExampleServicesOnAPIServer creates each shipped example's relay
// Service on a real kube-apiserver (which fills in its defaults), gives it
// the load-balancer address the example asks MetalLB for, and checks that
// the relay, configured as the example's pod is, finds its own port there
// among the others (DERP, STUN).
func TestExampleServicesOnAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	for _, tc := range []struct {
		dir, svc string
		ports    int // how many ports the Service has
	}{
		{"../manifests", "tsrelay", 1},
		{"../examples/derp", "tsrelay", 3},
		{"../examples/ha", "tsrelay-1", 1},
		{"../examples/ha-derp", "tsrelay-0", 3},
		{"../examples/ha-derp", "tsrelay-1", 3},
	} {
		t.Run(filepath.Base(tc.dir)+"/"+tc.svc, func(t *testing.T) {
			r := renderRelay(t, tc.dir, tc.svc)
			if r.portName != defaultRelayPortName {
				t.Errorf("the relay's container port %d is named %q, want %q (TS_RELAY_SERVICE_PORT_NAME's default)", r.port, r.portName, defaultRelayPortName)
			}
			if len(r.svc.Spec.Ports) != tc.ports {
				t.Errorf("Service %s has ports %v, want %d", tc.svc, r.svc.Spec.Ports, tc.ports)
			}
			lbIP, err := netip.ParseAddr(r.svc.Annotations["metallb.io/loadBalancerIPs"])
			if err != nil {
				lbIP = netip.MustParseAddr("192.0.2.10") // the base install leaves the address to the user
			}
			ns := srv.NamespaceForTest(t, nil)
			svc := r.svc.DeepCopy()
			svc.Namespace = ns
			created, err := admin.CoreV1().Services(ns).Create(t.Context(), svc, metav1.CreateOptions{})
			if err != nil {
				t.Fatalf("create Service %s: %v", tc.svc, err)
			}
			created.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: lbIP.String()}}
			if _, err := admin.CoreV1().Services(ns).UpdateStatus(t.Context(), created, metav1.UpdateOptions{}); err != nil {
				t.Fatalf("set the Service's load-balancer status: %v", err)
			}
			rule := rbacv1.PolicyRule{
				APIGroups: []string{""}, Resources: []string{"services"}, ResourceNames: []string{tc.svc},
				Verbs: []string{"get", "list", "watch"},
			}
			rec := startWatch(t, Config{
				Client: srv.DynamicClientForTest(t, ns, "relay", rule), Namespace: ns, Name: tc.svc,
				RelayPort: r.port, RelayPortName: defaultRelayPortName,
			})
			// The Service port that leads to the relay: the one the
			// example's Service exposes for the relay's container port.
			var want uint16
			for _, p := range r.svc.Spec.Ports {
				if p.TargetPort.String() == r.portName || p.TargetPort.IntValue() == int(r.port) {
					want = uint16(p.Port)
				}
			}
			if want == 0 {
				t.Fatalf("Service %s has no port to the relay's container port %d (%s): %v", tc.svc, r.port, r.portName, r.svc.Spec.Ports)
			}
			got := rec.waitFound(t, ep(netip.AddrPortFrom(lbIP, want).String(), SourceService))
			t.Logf("%s: %v", fmt.Sprint(r.svc.Spec.Ports), got)
		})
	}
}
