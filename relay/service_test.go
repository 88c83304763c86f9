package relay

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/lbaddr"
)

// TestEndpointsFollowService runs the appliance in process, following its
// Service on a real kube-apiserver as a ServiceAccount limited to that one
// Service, and changes the Service's load-balancer status step by step:
// after each change the relay's prefs, read back through its local API,
// must be the explicit endpoint followed by the load balancer's addresses
// with the Service port (which differs from the relay's port).
func TestEndpointsFollowService(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a tailnet and a kube-apiserver; skipped in -short mode")
	}
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	control := tailnettest.StartControlForTest(t)
	ctx := t.Context()

	relayPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	const servicePort = 41000
	ns := srv.NamespaceForTest(t, nil)
	svc, err := admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "tsrelay"},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeLoadBalancer,
			Selector: map[string]string{"app": "tsrelay"},
			Ports: []corev1.ServicePort{{
				Name: "relay", Protocol: corev1.ProtocolUDP,
				Port: servicePort, TargetPort: intstr.FromInt32(int32(relayPort)),
			}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// The relay acts as a ServiceAccount that may read this Service only.
	srv.GrantForTest(t, ns, "tsrelay", rbacRule("services", "tsrelay", "get", "list", "watch"))
	kubeconfig := srv.KubeconfigForTest(t, ns, "tsrelay")
	t.Setenv("KUBECONFIG", kubeconfig)
	kc, err := kubeclient.New()
	if err != nil {
		t.Fatal(err)
	}

	explicit := netip.MustParseAddrPort("203.0.113.7:61441")
	logger := slog.New(slog.NewTextHandler(t.Output(), nil))
	cfg := Config{
		AuthKey:                    control.AuthKey,
		ControlURL:                 control.URL,
		Hostname:                   "relay",
		StateDir:                   t.TempDir(),
		RelayServerPort:            Port(relayPort),
		RelayServerStaticEndpoints: Endpoints{explicit},
		RelayService:               "tsrelay",
	}
	// The same wiring as Run.
	a := testAppliance(t, cfg, serviceRef(cfg, kc))
	service, err := newServiceWatch(ctx, cfg, kc, a.foundEndpoints, logger)
	if err != nil {
		t.Fatal(err)
	}
	runForTest(t, a, service.run)

	lc := func() bool { return a.localClient() != nil }
	if err := tailnettest.WaitFor(ctx, 20*time.Millisecond, func() (bool, error) { return lc(), nil }); err != nil {
		t.Fatal(err)
	}
	prefsEndpoints := func() ([]netip.AddrPort, error) {
		p, err := a.localClient().GetPrefs(ctx)
		if err != nil {
			return nil, err
		}
		return p.RelayServerStaticEndpoints, nil
	}
	// waitPrefs waits until the relay's prefs list exactly want.
	waitPrefs := func(step string, want ...netip.AddrPort) {
		t.Helper()
		wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
		defer wcancel()
		var got []netip.AddrPort
		err := tailnettest.WaitFor(wctx, 10*time.Millisecond, func() (bool, error) {
			got, err = prefsEndpoints()
			return err == nil && slices.Equal(got, want), nil
		})
		if err != nil {
			t.Fatalf("%s: relay prefs have static endpoints %v, want %v (%v)", step, got, want, err)
		}
	}
	// The relay logs in with only the explicit endpoint: the Service has no
	// load-balancer address yet.
	waitPrefs("before any address", explicit)

	ep := func(s string) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr(s), servicePort) }
	// localhost stands in for an NLB's hostname; what it resolves to here
	// comes from /etc/hosts.
	hostAddrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	var fromHost []netip.AddrPort
	for _, ip := range hostAddrs {
		if ap := netip.AddrPortFrom(ip.Unmap(), servicePort); !slices.Contains(fromHost, ap) {
			fromHost = append(fromHost, ap)
		}
	}
	slices.SortFunc(fromHost, netip.AddrPort.Compare)

	for _, step := range []struct {
		name    string
		ingress []corev1.LoadBalancerIngress
		want    []netip.AddrPort
	}{
		{"IPv4", []corev1.LoadBalancerIngress{{IP: "192.0.2.10"}}, []netip.AddrPort{ep("192.0.2.10")}},
		{"IPv6", []corev1.LoadBalancerIngress{{IP: "2001:db8::10"}}, []netip.AddrPort{ep("2001:db8::10")}},
		{"both", []corev1.LoadBalancerIngress{{IP: "2001:db8::10"}, {IP: "192.0.2.10"}}, []netip.AddrPort{ep("192.0.2.10"), ep("2001:db8::10")}},
		{"hostname", []corev1.LoadBalancerIngress{{Hostname: "localhost"}}, fromHost},
		{"changed", []corev1.LoadBalancerIngress{{IP: "192.0.2.11"}}, []netip.AddrPort{ep("192.0.2.11")}},
		{"removed", nil, nil},
	} {
		svc.Status.LoadBalancer.Ingress = step.ingress
		svc, err = admin.CoreV1().Services(ns).UpdateStatus(ctx, svc, metav1.UpdateOptions{})
		if err != nil {
			t.Fatalf("%s: update Service status: %v", step.name, err)
		}
		waitPrefs(step.name, append([]netip.AddrPort{explicit}, step.want...)...)
	}
	st := a.status.snapshot()
	if len(st.Relay.StaticEndpoints) != 1 || st.Relay.StaticEndpoints[0].Source != string(lbaddr.SourceExplicit) {
		t.Errorf("status endpoints after removal = %+v, want only the explicit one", st.Relay.StaticEndpoints)
	}
	if st.Relay.Service != ns+"/tsrelay" {
		t.Errorf("status service = %q, want %s/tsrelay", st.Relay.Service, ns)
	}
}

// rbacRule is a core-group rule on one named resource.
func rbacRule(resource, name string, verbs ...string) rbacv1.PolicyRule {
	return rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{resource}, ResourceNames: []string{name}, Verbs: verbs}
}
