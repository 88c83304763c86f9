package manifests_test

import (
	"strconv"
	"testing"

	"github.com/tsrelay/tsrelay/internal/kubetest"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestMonitoringComponent renders examples/monitoring (the manifests plus
// components/monitoring) and checks that the pieces connect: the
// ServiceMonitor selects the metrics Service and names one of its ports,
// that Service selects the relay's pod and targets its HTTP port, and the
// pod's scrape annotations name the same port.
func TestMonitoringComponent(t *testing.T) {
	byName := map[string]*unstructured.Unstructured{}
	for _, o := range kubetest.KustomizeObjectsForTest(t, "..", "../examples/monitoring") {
		byName[o.GetKind()+"/"+o.GetName()] = o
		if o.GetNamespace() != "kube-public" {
			t.Errorf("%s %s is in namespace %q, want kube-public", o.GetKind(), o.GetName(), o.GetNamespace())
		}
	}
	sm, svc, dep := byName["ServiceMonitor/tsrelay"], byName["Service/tsrelay-metrics"], byName["Deployment/tsrelay"]
	if sm == nil || svc == nil || dep == nil {
		t.Fatalf("rendered objects lack the ServiceMonitor, the metrics Service or the Deployment: %v", keys(byName))
	}

	smSel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
	if !subset(smSel, svc.GetLabels()) {
		t.Errorf("ServiceMonitor selector %v does not match the metrics Service's labels %v", smSel, svc.GetLabels())
	}
	svcPorts := map[string]any{} // Service port name → targetPort
	ports, _, _ := unstructured.NestedSlice(svc.Object, "spec", "ports")
	for _, p := range ports {
		p := p.(map[string]any)
		svcPorts[p["name"].(string)] = p["targetPort"]
	}
	endpoints, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
	for _, e := range endpoints {
		if name := e.(map[string]any)["port"]; svcPorts[name.(string)] == nil {
			t.Errorf("ServiceMonitor endpoint port %q is not a port of the metrics Service (%v)", name, svcPorts)
		}
	}

	svcSel, _, _ := unstructured.NestedStringMap(svc.Object, "spec", "selector")
	podLabels, _, _ := unstructured.NestedStringMap(dep.Object, "spec", "template", "metadata", "labels")
	if !subset(svcSel, podLabels) {
		t.Errorf("metrics Service selector %v does not match the pod's labels %v", svcSel, podLabels)
	}
	containerPorts := map[string]int64{} // YAML numbers decode as float64 or int64
	containers, _, _ := unstructured.NestedSlice(dep.Object, "spec", "template", "spec", "containers")
	for _, c := range containers {
		cps, _, _ := unstructured.NestedSlice(c.(map[string]any), "ports")
		for _, p := range cps {
			p := p.(map[string]any)
			switch n := p["containerPort"].(type) {
			case int64:
				containerPorts[p["name"].(string)] = n
			case float64:
				containerPorts[p["name"].(string)] = int64(n)
			}
		}
	}
	if tp, ok := svcPorts["http"].(string); !ok || containerPorts[tp] == 0 {
		t.Errorf("metrics Service targetPort %v is not a container port (%v)", svcPorts["http"], containerPorts)
	}
	ann, _, _ := unstructured.NestedStringMap(dep.Object, "spec", "template", "metadata", "annotations")
	if ann["prometheus.io/port"] != strconv.FormatInt(containerPorts["http"], 10) || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("pod scrape annotations %v do not name the http port %d and /metrics", ann, containerPorts["http"])
	}
}

func subset(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false // an empty selector selects everything: not what we want
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
