package manifests_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tsrelay/tsrelay/internal/kubetest"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestNetworkPolicyComponent renders the base with components/derp and
// components/networkpolicy and checks that the policy selects the relay's
// pod, that every TCP port it names is a port of that pod, that the HTTP
// port is open only to the monitoring namespace, and that the public
// ports (UDP, DERP) are open to everyone.
func TestNetworkPolicyComponent(t *testing.T) {
	dir := t.TempDir()
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(dir, repo)
	if err != nil {
		t.Fatal(err)
	}
	k := `apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: kube-public
resources:
- ` + rel + `/manifests
components:
- ` + rel + `/manifests/components/derp
- ` + rel + `/manifests/components/networkpolicy
`
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o600); err != nil {
		t.Fatal(err)
	}
	var np *networkingv1.NetworkPolicy
	podLabels := map[string]string{}
	podPorts := map[string]string{} // name → protocol
	for _, o := range kubetest.KustomizeObjectsForTest(t, "..", dir) {
		switch o.GetKind() {
		case "NetworkPolicy":
			np = &networkingv1.NetworkPolicy{}
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, np); err != nil {
				t.Fatal(err)
			}
			if o.GetNamespace() != "kube-public" {
				t.Errorf("NetworkPolicy in namespace %q, want the relay's, kube-public", o.GetNamespace())
			}
		case "Deployment":
			podLabels, _, _ = unstructured.NestedStringMap(o.Object, "spec", "template", "metadata", "labels")
			cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
			for _, c := range cs {
				ps, _, _ := unstructured.NestedSlice(c.(map[string]any), "ports")
				for _, p := range ps {
					p := p.(map[string]any)
					podPorts[p["name"].(string)] = p["protocol"].(string)
				}
			}
		}
	}
	if np == nil {
		t.Fatal("no NetworkPolicy rendered")
	}
	for k, v := range np.Spec.PodSelector.MatchLabels {
		if podLabels[k] != v {
			t.Errorf("NetworkPolicy selects %s=%s; the pod has %v", k, v, podLabels)
		}
	}
	if !slices.Equal(np.Spec.PolicyTypes, []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}) {
		t.Errorf("policyTypes %v, want [Ingress] (egress stays open: control, DERP, STUN, peers)", np.Spec.PolicyTypes)
	}
	openUDP, openDERP, httpFrom := false, false, []networkingv1.NetworkPolicyPeer(nil)
	for _, rule := range np.Spec.Ingress {
		for _, p := range rule.Ports {
			switch {
			case *p.Protocol == "UDP" && p.Port == nil && len(rule.From) == 0:
				openUDP = true
			case p.Port != nil && p.Port.Type == intstr.String:
				if proto, ok := podPorts[p.Port.StrVal]; !ok || proto != string(*p.Protocol) {
					t.Errorf("policy port %s/%s is not a port of the pod (%v)", p.Port.StrVal, *p.Protocol, podPorts)
				}
				if p.Port.StrVal == "derp" && len(rule.From) == 0 {
					openDERP = true
				}
				if p.Port.StrVal == "http" {
					httpFrom = rule.From
				}
			}
		}
	}
	if !openUDP || !openDERP {
		t.Errorf("public ports open to everyone: UDP %v, DERP %v; want both", openUDP, openDERP)
	}
	if len(httpFrom) != 1 || httpFrom[0].NamespaceSelector == nil || httpFrom[0].NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] != "monitoring" || httpFrom[0].IPBlock != nil || httpFrom[0].PodSelector != nil {
		t.Errorf("HTTP port open to %+v, want only the monitoring namespace", httpFrom)
	}
}
