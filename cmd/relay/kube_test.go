package main

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/lbaddr"
)

// TestRelayKubeState runs the real relay binary outside a cluster, with a
// kubeconfig holding a ServiceAccount token from the TokenRequest API and
// only the RBAC that manifests/install.yaml grants, against a real
// kube-apiserver and the in-process tailnet. It checks that the node state
// lands in the Secret, that after kill -9 the relay comes back as the same
// node from the Secret alone (no auth key, as when the user has deleted the
// key Secret), and that the key itself is never stored. A second relay
// started on the same Secret while the first runs waits, unready and
// without a node, on the Lease, and takes over once the first is killed.
func TestRelayKubeState(t *testing.T) {
	bins := binaries(t)
	srv := startWithShippedRBAC(t)
	admin := srv.AdminClientForTest(t)
	ctx := t.Context()
	const ns, secret = "kube-public", "tsrelay-state"
	srv.WaitAllowedForTest(t, ns, "tsrelay", authzv1.ResourceAttributes{Namespace: ns, Verb: "get", Resource: "secrets", Name: secret})
	kubeconfig := srv.KubeconfigForTest(t, ns, "tsrelay")

	control := tailnettest.StartControlForTest(t)
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	// A short lease, so that the takeover after kill -9 fits the test.
	const leaseDuration = 6 * time.Second
	env := []string{
		"KUBECONFIG=" + kubeconfig,
		"TS_KUBE_SECRET=" + secret,
		"TS_CONTROL_URL=" + control.URL,
		fmt.Sprintf("TS_RELAY_SERVER_PORT=%d", port),
		fmt.Sprintf("TS_LEASE_DURATION=%s", leaseDuration),
	}
	// Each start gets a new scratch directory, as a new pod gets a new
	// emptyDir: everything that survives must be in the Secret.
	scratch := func() string { return "TS_STATE_DIR=" + t.TempDir() }
	// The downward API's variables, as the Deployment sets them.
	pod := func(name string) []string {
		return []string{"POD_NAME=" + name, "POD_NAMESPACE=" + ns, "POD_UID=" + name + "-uid"}
	}
	relay := startRelay(t, bins, "relay", append(append(env, pod("tsrelay-1")...), scratch(), "TS_AUTHKEY="+control.AuthKey)...)
	waitReady(t, relay)
	// One Event per transition on the pod, and none per state write.
	waitEvents(t, admin, ns, "tsrelay-1", map[string]int32{"StateLoaded": 1, "LoggedIn": 1, "RelayBound": 1})
	rs, err := relay.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs.TailscaleIPs) == 0 {
		t.Fatalf("relay reports no tailnet IPs: %+v", rs)
	}
	relayIP := rs.TailscaleIPs[0]
	// Which identity this process runs, so that replicas' series tell
	// apart: the Secret (namespace/name) and the names it goes by.
	if fams, err := relay.Metrics(ctx); err != nil {
		t.Errorf("/metrics: %v", err)
	} else if v, _ := tailnettest.MetricSum(fams, "tsrelay_identity_info", "hostname", "tsrelay", "state", ns+"/"+secret, "dns_name", rs.DNSName); v != 1 || rs.DNSName == "" {
		t.Errorf("tsrelay_identity_info{hostname=tsrelay,state=%s/%s,dns_name=%q} = %v, want 1 (series: %v)", ns, secret, rs.DNSName, v, fams["tsrelay_identity_info"])
	}

	sec, err := admin.CoreV1().Secrets(ns).Get(ctx, secret, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("state secret: %v", err)
	}
	var keys []string
	for k, v := range sec.Data {
		keys = append(keys, k)
		if strings.Contains(string(v), control.AuthKey) {
			t.Errorf("state secret key %s holds the auth key", k)
		}
	}
	slices.Sort(keys)
	// The machine key and a login profile, under encoded names.
	if !slices.Contains(keys, "_machinekey") || len(keys) < 3 {
		t.Errorf("state secret keys = %v, want _machinekey and a profile", keys)
	}
	t.Logf("state secret %s/%s: %d keys %v, resourceVersion %s; relay RSS %s", ns, secret, len(keys), keys, sec.ResourceVersion, rss(relay.Pid()))

	// A second pod on the same Secret while the first runs, as when a
	// partitioned node's pod is replaced: it must wait, unready, and
	// start no node. It has no key: the Secret alone must bring back the
	// same node once it may run it.
	nodesBefore := control.Server.NumNodes()
	// The control server's view of the relay's node: a second process
	// running the same identity would announce its own disco key (each
	// process makes a new one), which is what broke peers' paths before
	// the lease. It must not change while the second relay waits.
	relayDisco := func() (key.DiscoPublic, bool) {
		for _, n := range control.Server.AllNodes() {
			for _, a := range n.Addresses {
				if a.Addr() == relayIP {
					return n.DiscoKey, true
				}
			}
		}
		return key.DiscoPublic{}, false
	}
	discoBefore, ok := relayDisco()
	if !ok || discoBefore.IsZero() {
		t.Fatalf("control has no disco key for the relay's node %s", relayIP)
	}
	control.AllowRegisterWithoutKey()
	relay2 := startRelay(t, bins, "relay-second", append(append(env, pod("tsrelay-2")...), scratch())...)
	waitUnready(t, relay2, "waiting for the node identity, held by tsrelay-1_tsrelay-1-uid")
	waitEvents(t, admin, ns, "tsrelay-2", map[string]int32{"IdentityHeldElsewhere": 1})
	// Dashboards and alerts see it wait: the exposition must parse.
	if fams, err := relay2.Metrics(ctx); err != nil {
		t.Errorf("/metrics of the waiting relay: %v", err)
	} else if v, ok := tailnettest.MetricSum(fams, "tsrelay_identity_waiting"); !ok || v != 1 {
		t.Errorf("waiting relay: tsrelay_identity_waiting = %v (present %v), want 1", v, ok)
	} else if v, _ := tailnettest.MetricSum(fams, "tsrelay_ready"); v != 0 {
		t.Errorf("waiting relay: tsrelay_ready = %v, want 0", v)
	} else if v, _ := tailnettest.MetricSum(fams, "tsrelay_identity_info", "hostname", "tsrelay", "state", ns+"/"+secret); v != 1 {
		t.Errorf("waiting relay: tsrelay_identity_info{hostname=tsrelay,state=%s/%s} = %v, want 1 (series: %v)", ns, secret, v, fams["tsrelay_identity_info"])
	}
	// Several lease durations pass: the first renews, the second waits.
	waitUntil := time.Now().Add(3 * leaseDuration)
	for time.Now().Before(waitUntil) {
		waitUnready(t, relay2, "waiting for the node identity")
		if _, err := relay.Status(ctx); err != nil {
			t.Fatalf("first relay stopped answering while the second waited: %v", err)
		}
		if strings.Contains(relay2.LogTail(200), "kube state loaded") {
			t.Fatal("the second relay loaded the node state while the first held the lease")
		}
		if d, _ := relayDisco(); d != discoBefore {
			t.Fatalf("control saw the relay node's disco key change from %v to %v while the second relay waited: two processes ran the identity", discoBefore, d)
		}
	}
	if n := control.Server.NumNodes(); n != nodesBefore {
		t.Errorf("control has %d nodes while the second relay waits, want %d", n, nodesBefore)
	}

	// kill -9: no chance to flush anything or release the lease.
	relay.Kill()
	killedAt := time.Now()
	waitReady(t, relay2)
	took := time.Since(killedAt)
	t.Logf("second relay ready %v after kill -9 of the first (lease duration %v); RSS %s", took.Round(time.Millisecond), leaseDuration, rss(relay2.Pid()))
	if took < leaseDuration*5/6 {
		t.Errorf("second relay ready %v after the kill, before the first's lease could have expired (%v)", took, leaseDuration)
	}
	rs2, err := relay2.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs2.TailscaleIPs) == 0 || rs2.TailscaleIPs[0] != relayIP {
		t.Errorf("after kill -9 and restart the relay has IPs %v, want %s", rs2.TailscaleIPs, relayIP)
	}
	// The disco-key check above can see a second process: the one that
	// took over announces its own.
	dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
	defer dcancel()
	if err := tailnettest.WaitFor(dctx, 50*time.Millisecond, func() (bool, error) {
		d, ok := relayDisco()
		return ok && d != discoBefore, nil
	}); err != nil {
		t.Errorf("control never saw the new process's disco key after the takeover: %v", err)
	}
	if n := control.Server.NumNodes(); n != nodesBefore {
		t.Errorf("control has %d nodes after the restart, want %d: the relay logged in as a new node", n, nodesBefore)
	}
	waitEvents(t, admin, ns, "tsrelay-2", map[string]int32{"IdentityHeldElsewhere": 1, "StateLoaded": 1, "LoggedIn": 1, "RelayBound": 1})
	lease, err := admin.CoordinationV1().Leases(ns).Get(ctx, secret, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("lease: %v", err)
	}
	if h := lease.Spec.HolderIdentity; h == nil || *h != "tsrelay-2_tsrelay-2-uid" {
		t.Errorf("lease holder = %v, want tsrelay-2_tsrelay-2-uid", h)
	}

	// A clean stop releases the lease, so the next pod need not wait.
	if err := relay2.Stop(ctx); err != nil {
		t.Errorf("stop second relay: %v", err)
	}
	lease, err = admin.CoordinationV1().Leases(ns).Get(ctx, secret, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("lease: %v", err)
	}
	if h := lease.Spec.HolderIdentity; h != nil && *h != "" {
		t.Errorf("lease holder after a clean stop = %q, want none", *h)
	}
}

// waitEvents waits until the Events on pod are exactly want (reason →
// count), and fails the test if they never are.
func waitEvents(t *testing.T, admin kubernetes.Interface, ns, pod string, want map[string]int32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	got := map[string]int32{}
	err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		list, err := admin.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod})
		if err != nil {
			return false, err
		}
		clear(got)
		for _, e := range list.Items {
			if e.InvolvedObject.Kind != "Pod" || e.InvolvedObject.UID != types.UID(pod+"-uid") || e.Source.Component != "tsrelay" {
				return false, fmt.Errorf("event %s is about %+v from %q", e.Name, e.InvolvedObject, e.Source.Component)
			}
			got[e.Reason] += e.Count
		}
		return maps.Equal(got, want), nil
	})
	if err != nil {
		t.Fatalf("Events on pod %s = %v, want %v: %v", pod, got, want, err)
	}
}

// TestRelayFollowsLoadBalancer is the load-balancer case end to end, dual
// stack as in the user report that started the project: the real relay,
// deployed with the shipped RBAC and Service (PreferDualStack) on a
// dual-stack API server, learns its public addresses only from the
// Service's load-balancer status, one IPv6 and one IPv4 ingress listed in
// that order, and advertises both, IPv4 first as the README documents.
// Laptop a can reach the relay only at the IPv4 address and laptop b only
// at the IPv6 one, so their pongs prove that both endpoints work. The "load
// balancers" are port forwards on 127.0.0.2 (an address of nothing else
// here) and ::1 (which the relay never advertises by itself) to the relay's
// port, so the Service port differs from the relay's port, as it may in a
// cluster.
func TestRelayFollowsLoadBalancer(t *testing.T) {
	bins := binaries(t)
	requireIPv6Loopback(t)
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()

	// The laptops first: the load balancers let each in by its port.
	a := tailnettest.StartLaptopForTest(t, bins, "a")
	b := tailnettest.StartLaptopForTest(t, bins, "b")
	relayPort, err := tailnettest.FreeDualStackUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	sinkInterfaceAddrs(t, relayPort, func(ip netip.Addr) bool { return ip != netip.IPv6Loopback() })
	lb4, lb6 := dualStackLoadBalancer(t, relayPort, a.Port, b.Port)

	// The ServiceAccount, Role, RoleBinding and Service as shipped, with the
	// Service's port moved to the one the "load balancers" listen on.
	objs := shippedObjects(t, "ServiceAccount", "Role", "RoleBinding", "Service")
	for _, o := range objs {
		if o.GetKind() != "Service" {
			continue
		}
		ports, _, _ := unstructured.NestedSlice(o.Object, "spec", "ports")
		for _, p := range ports {
			if p := p.(map[string]any); p["protocol"] == "UDP" {
				p["port"] = int64(lb4.Port())
			}
		}
		if err := unstructured.SetNestedSlice(o.Object, ports, "spec", "ports"); err != nil {
			t.Fatal(err)
		}
	}
	if err := kubetest.Apply(ctx, srv.Admin, objs, metav1.ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	const ns = "kube-public"
	srv.WaitAllowedForTest(t, ns, "tsrelay",
		authzv1.ResourceAttributes{Namespace: ns, Verb: "get", Resource: "secrets", Name: "tsrelay-state"},
		authzv1.ResourceAttributes{Namespace: ns, Verb: "watch", Resource: "services", Name: "tsrelay"})
	kubeconfig := srv.KubeconfigForTest(t, ns, "tsrelay")

	control := tailnettest.StartControlForTest(t)
	relay := startRelay(t, bins, "relay",
		"POD_NAME=tsrelay-lb", "POD_NAMESPACE="+ns, "POD_UID=tsrelay-lb-uid",
		"KUBECONFIG="+kubeconfig,
		"TS_KUBE_SECRET=tsrelay-state",
		"TS_RELAY_SERVICE=tsrelay",
		"TS_STATE_DIR="+t.TempDir(),
		"TS_CONTROL_URL="+control.URL,
		"TS_AUTHKEY="+control.AuthKey,
		fmt.Sprintf("TS_RELAY_SERVER_PORT=%d", relayPort),
	)
	// Logged in and bound, but no address peers could use yet.
	waitUnready(t, relay, "waiting for load balancer address: Service kube-public/tsrelay has no load-balancer address")

	// The load-balancer controller assigns the addresses, IPv6 first as
	// MetalLB listed them in the user report.
	svc, err := admin.CoreV1().Services(ns).Get(ctx, "tsrelay", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if fams := svc.Spec.IPFamilies; !slices.Equal(fams, []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}) {
		t.Errorf("shipped Service on a dual-stack cluster has ipFamilies %v, want [IPv4 IPv6]", fams)
	}
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: lb6.Addr().String()}, {IP: lb4.Addr().String()}}
	if _, err := admin.CoreV1().Services(ns).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	assigned := time.Now()
	waitReady(t, relay)
	t.Logf("relay ready %v after the Service got its addresses", time.Since(assigned).Round(time.Millisecond))
	rs, err := relay.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range rs.Relay.StaticEndpoints {
		got = append(got, e.AddrPort.String()+" "+e.Source)
	}
	if want := []string{lb4.String() + " " + string(lbaddr.SourceService), lb6.String() + " " + string(lbaddr.SourceService)}; !slices.Equal(got, want) {
		t.Errorf("relay static endpoints = %q, want %q", got, want)
	}
	if v, _ := tailnettest.MetricSum(relayMetrics(t, relay), "tsrelay_static_endpoints", "source", "service"); v != 2 {
		t.Errorf(`tsrelay_static_endpoints{source="service"} = %v, want 2`, v)
	}

	waitEvents(t, admin, ns, "tsrelay-lb", map[string]int32{"StateLoaded": 1, "LoggedIn": 1, "RelayBound": 1, "EndpointsChanged": 1})

	ipA := tailnettest.UpForTest(t, control, a)
	ipB := tailnettest.UpForTest(t, control, b)
	if err := a.WaitForPeer(ctx, ipB); err != nil {
		t.Fatal(err)
	}
	if err := b.WaitForPeer(ctx, ipA); err != nil {
		t.Fatal(err)
	}
	pingUntilVia(t, ctx, a, ipB, "via peer-relay("+lb4.String()+":vni:")
	pingUntilVia(t, ctx, b, ipA, "via peer-relay("+lb6.String()+":vni:")
}

// dualStackLoadBalancer stands for a dual-stack load balancer in front of
// the relay's port: port forwards on 127.0.0.2 and ::1 at one port, as a
// Service has one port for both families. Only the client on port from4
// may use the IPv4 one and only the one on port from6 the IPv6 one.
func dualStackLoadBalancer(t *testing.T, relayPort, from4, from6 int) (lb4, lb6 netip.AddrPort) {
	t.Helper()
	only := func(port int) func(netip.AddrPort) bool {
		return func(c netip.AddrPort) bool { return int(c.Port()) == port }
	}
	for range 20 {
		fwd4, err := tailnettest.StartPortForwardFor("127.0.0.2:0", netip.AddrPortFrom(netip.MustParseAddr(forwardTarget), uint16(relayPort)), only(from4))
		if err != nil {
			t.Fatal(err)
		}
		lb6 = netip.AddrPortFrom(netip.IPv6Loopback(), fwd4.Addr.Port())
		fwd6, err := tailnettest.StartPortForwardFor(lb6.String(), netip.AddrPortFrom(netip.IPv6Loopback(), uint16(relayPort)), only(from6))
		if err != nil {
			fwd4.Close() // that port is taken on ::1; try another
			continue
		}
		t.Cleanup(func() { fwd4.Close(); fwd6.Close() })
		return fwd4.Addr, fwd6.Addr
	}
	t.Fatal("no port free on both 127.0.0.2 and ::1 for the load balancer")
	return
}

// startWithShippedRBAC starts a real kube-apiserver with the
// ServiceAccount, Role and RoleBinding exactly as the manifests ship them.
func startWithShippedRBAC(t *testing.T) *kubetest.Server {
	t.Helper()
	srv := kubetest.StartForTest(t)
	objs := shippedObjects(t, "ServiceAccount", "Role", "RoleBinding")
	if err := kubetest.Apply(t.Context(), srv.Admin, objs, metav1.ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	return srv
}

// shippedObjects returns the objects of manifests/install.yaml of the given
// kinds, one of each, exactly as users apply them.
func shippedObjects(t *testing.T, kinds ...string) []*unstructured.Unstructured {
	t.Helper()
	objs, err := kubetest.ReadManifests(filepath.Join("..", "..", "manifests", "install.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	objs = slices.DeleteFunc(objs, func(o *unstructured.Unstructured) bool {
		return !slices.Contains(kinds, o.GetKind())
	})
	if len(objs) != len(kinds) {
		t.Fatalf("install.yaml has %d objects of kinds %v, want one of each", len(objs), kinds)
	}
	return objs
}

// TestRelayLeaseAndAPIServerOutages runs the real relay against a real API
// server that goes away: an outage shorter than the lease's renew deadline
// (kill -9 of kube-apiserver and an immediate restart) leaves it relaying
// and ready; one longer than that stops its node and exits non-zero before
// anyone else could take the lease over.
func TestRelayLeaseAndAPIServerOutages(t *testing.T) {
	bins := binaries(t)
	srv := startWithShippedRBAC(t)
	ctx := t.Context()
	const ns, secret = "kube-public", "tsrelay-state"
	srv.WaitAllowedForTest(t, ns, "tsrelay", authzv1.ResourceAttributes{Namespace: ns, Verb: "update", Group: "coordination.k8s.io", Resource: "leases", Name: secret})
	kubeconfig := srv.KubeconfigForTest(t, ns, "tsrelay")
	control := tailnettest.StartControlForTest(t)
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	// Renew deadline 25 s: far more than a restart of kube-apiserver takes
	// here (3 s idle), even on a busy machine.
	const leaseDuration = 30 * time.Second
	renewDeadline := leaseDuration * 5 / 6
	relay := startRelay(t, bins, "relay",
		"KUBECONFIG="+kubeconfig, "TS_KUBE_SECRET="+secret, "TS_STATE_DIR="+t.TempDir(),
		"TS_CONTROL_URL="+control.URL, "TS_AUTHKEY="+control.AuthKey,
		fmt.Sprintf("TS_RELAY_SERVER_PORT=%d", port), "TS_LEASE_DURATION="+leaseDuration.String())
	waitReady(t, relay)

	// Short: kill the API server and start it again at once.
	stopped := time.Now()
	srv.StopAPIServer()
	if err := srv.StartAPIServer(ctx); err != nil {
		t.Fatalf("restart kube-apiserver: %v", err)
	}
	back := time.Now()
	t.Logf("API server away for %v", back.Sub(stopped).Round(time.Millisecond))
	if back.Sub(stopped) >= renewDeadline {
		t.Fatalf("kube-apiserver took %v to restart, longer than the renew deadline %v: the short case did not happen", back.Sub(stopped), renewDeadline)
	}
	admin := srv.AdminClientForTest(t)
	wctx, cancel := context.WithTimeout(ctx, leaseDuration)
	defer cancel()
	err = tailnettest.WaitFor(wctx, 100*time.Millisecond, func() (bool, error) {
		l, err := admin.CoordinationV1().Leases(ns).Get(wctx, secret, metav1.GetOptions{})
		return err == nil && l.Spec.RenewTime != nil && l.Spec.RenewTime.After(back), nil
	})
	if err != nil {
		t.Fatalf("the relay did not renew its lease after the API server came back: %v", err)
	}
	select {
	case <-relay.Done():
		t.Fatalf("the relay exited after a %v API-server outage: %v", back.Sub(stopped), relay.Wait(ctx))
	default:
	}
	waitReady(t, relay)

	// Long: the API server stays away. The relay must stop within its
	// renew deadline, and before the lease duration.
	srv.StopAPIServer()
	stopped = time.Now()
	ectx, ecancel := context.WithTimeout(ctx, leaseDuration+10*time.Second)
	defer ecancel()
	exitErr := relay.Wait(ectx)
	took := time.Since(stopped)
	if ectx.Err() != nil {
		t.Fatalf("the relay still runs %v into an API-server outage (lease duration %v)", took, leaseDuration)
	}
	t.Logf("relay exited %v into the outage (renew deadline %v, lease duration %v): %v", took.Round(time.Millisecond), renewDeadline, leaseDuration, exitErr)
	if exitErr == nil {
		t.Error("the relay exited 0 after losing its lease, want non-zero so Kubernetes restarts it")
	}
	if took >= leaseDuration {
		t.Errorf("the relay stopped %v into the outage, not before the lease duration %v", took, leaseDuration)
	}
	if !strings.Contains(relay.LogTail(50), "not renewed for") {
		t.Errorf("the relay's log does not say the lease was not renewed:\n%s", relay.LogTail(20))
	}
}
