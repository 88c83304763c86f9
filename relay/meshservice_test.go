package relay

import (
	"context"
	"net/netip"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// TestDERPMeshServices runs the DERP region of replica tsrelay-0 against a
// real kube-apiserver, as a ServiceAccount with exactly the rules of
// components/ha-derp for the mesh: it creates the mesh Secret, follows
// both members' Services, and its derpMap lists both Services'
// load-balancer IPs at their derp port, in TS_DERP_MESH_PEERS order; its
// mesh link to tsrelay-1 dials that Service's cluster IP.
func TestDERPMeshServices(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a kube-apiserver; skipped in -short mode")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	ctx := t.Context()
	ns := srv.NamespaceForTest(t, nil)

	const servicePort = 18443
	lbIPs := map[string]string{"tsrelay-0": "192.0.2.20", "tsrelay-1": "192.0.2.21"}
	clusterIPs := map[string]string{}
	for _, name := range []string{"tsrelay-0", "tsrelay-1"} {
		svc, err := admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{
				Type:     corev1.ServiceTypeLoadBalancer,
				Selector: map[string]string{"statefulset.kubernetes.io/pod-name": name},
				Ports: []corev1.ServicePort{
					{Name: "relay", Protocol: corev1.ProtocolUDP, Port: 41000, TargetPort: intstr.FromInt32(40000)},
					{Name: "derp", Protocol: corev1.ProtocolTCP, Port: servicePort, TargetPort: intstr.FromString("derp")},
				},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		clusterIPs[name] = svc.Spec.ClusterIP
		svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: lbIPs[name]}}
		if _, err := admin.CoreV1().Services(ns).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("update Service %s status: %v", name, err)
		}
	}
	srv.GrantForTest(t, ns, "tsrelay",
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"services"}, ResourceNames: []string{"tsrelay-0", "tsrelay-1"}, Verbs: []string{"get", "list", "watch"}},
		rbacRule("secrets", "tsrelay-derp-mesh", "get", "update"),
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
	)
	t.Setenv("KUBECONFIG", srv.KubeconfigForTest(t, ns, "tsrelay"))
	kc, err := kubeclient.New()
	if err != nil {
		t.Fatal(err)
	}

	stunPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	derpAddr, err := tailnettest.FreeTCPAddr()
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Hostname:        "relay",
		StateDir:        t.TempDir(),
		KubeSecret:      "tsrelay-0-state",
		RelayService:    "tsrelay-0",
		RelayServerPort: 40000,
		LocalAddrPort:   ListenAddr(netip.MustParseAddrPort("127.0.0.1:9002")),
		LeaseDuration:   90 * time.Second,
		DERPConfig: DERPConfig{
			DERPPort: Port(netip.MustParseAddrPort(derpAddr).Port()), STUNPort: Port(stunPort),
			RegionID: 900, RegionCode: "tsrelay", MaxUnadmitted: 256, AcceptRate: 100,
			MeshSecret: "tsrelay-derp-mesh", MeshPeers: derpregion.MeshMembers{"tsrelay-0", "tsrelay-1"},
		},
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a := testAppliance(t, cfg, "")
	region, err := derpregion.Setup(ctx, cfg.DERPConfig, a.derpDeps(kc))
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- region.Run(rctx) }()
	t.Cleanup(func() { cancel(); <-done })

	mesh, err := admin.CoreV1().Secrets(ns).Get(ctx, "tsrelay-derp-mesh", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("mesh Secret: %v", err)
	}
	if len(mesh.Data["mesh-key"]) != 64 || len(mesh.Data["tls.crt"]) == 0 || len(mesh.Data["tls.key"]) == 0 {
		t.Errorf("mesh Secret has keys %v, want mesh-key (64 hex digits), tls.crt and tls.key", keysOf(mesh.Data))
	}
	shared, err := derpregion.ParseShared(mesh.Data, time.Now())
	if err != nil {
		t.Fatalf("mesh Secret: %v", err)
	}
	certName := shared.Cert.CertName() // the region's shared certificate

	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	var st string
	err = tailnettest.WaitFor(wctx, 20*time.Millisecond, func() (bool, error) {
		s := region.Status()
		if s.DERPMap == nil {
			st = s.NoDERPMap
			return false, nil
		}
		r := s.DERPMap.Regions[900]
		st = ""
		for _, n := range r.Nodes {
			st += n.Name + "=" + n.IPv4 + ":" + strconv.Itoa(n.DERPPort) + " "
		}
		return len(r.Nodes) == 2 && r.Nodes[0].IPv4 == lbIPs["tsrelay-0"] && r.Nodes[1].IPv4 == lbIPs["tsrelay-1"] &&
			r.Nodes[0].DERPPort == servicePort && r.Nodes[1].DERPPort == servicePort &&
			r.Nodes[0].CertName == certName && r.Nodes[1].CertName == certName, nil
	})
	if err != nil {
		t.Fatalf("derpMap nodes %q, want tsrelay-0 at %s:%d and tsrelay-1 at %s:%d with the shared cert: %v",
			st, lbIPs["tsrelay-0"], servicePort, lbIPs["tsrelay-1"], servicePort, err)
	}
	want := netip.AddrPortFrom(netip.MustParseAddr(clusterIPs["tsrelay-1"]), servicePort).String()
	err = tailnettest.WaitFor(wctx, 20*time.Millisecond, func() (bool, error) {
		p := region.Status().MeshPeers
		return len(p) == 1 && p[0].Name == "tsrelay-1" && p[0].Addr == want, nil
	})
	if err != nil {
		t.Errorf("mesh peers %+v, want only tsrelay-1 dialled at its cluster IP %s: %v", region.Status().MeshPeers, want, err)
	}
}

func keysOf(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
