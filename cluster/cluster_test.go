//go:build linux

package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/kubecluster"
	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// namespace is where every example installs the relay.
const namespace = metav1.NamespacePublic

// relayPort is the relay's UDP port in the manifests.
const relayPort = 61441

// example is one shipped kustomization and what it must give.
type example struct {
	dir string // under the module root
	// pods are the relay pods' names for a StatefulSet; empty means the
	// Deployment's one pod.
	pods []string
	// services are the LoadBalancer Services, in the order of pods.
	services []string
	derp     bool // serves the in-cluster DERP region
	monitor  bool // has a ServiceMonitor and the tsrelay-metrics Service
}

// ha is the StatefulSet's relays and Services.
var (
	haPods     = []string{"tsrelay-0", "tsrelay-1"}
	haServices = []string{"tsrelay-0", "tsrelay-1"}
)

// examples are every kustomization the project ships, in the order the
// test applies them.
var examples = []example{
	{dir: "manifests", services: []string{"tsrelay"}},
	{dir: "examples/monitoring", services: []string{"tsrelay"}, monitor: true},
	{dir: "examples/derp", services: []string{"tsrelay"}, derp: true},
	{dir: "examples/ha", pods: haPods, services: haServices},
	{dir: "examples/ha-derp", pods: haPods, services: haServices, derp: true},
}

// TestExamples applies every shipped example with `kubectl apply -k`, the
// kubectl users have (built from the Kubernetes release the project
// follows), to a real single-node cluster (internal/kubecluster) running
// the relay image built from this checkout as the Dockerfile builds it.
// The only additions are what a user adds: the tsrelay-auth Secret and the
// tsrelay-config ConfigMap, pointing the relay at the test's tailnet. For
// each example: every relay pod becomes Ready; each relay holds its
// identity (its state Secret and its Lease); its Services have their
// load-balancer address and ports; two laptops that may not talk directly
// get a relayed path through a load-balancer address (tailscale ping shows
// "via peer-relay(<LB IP>:61441:vni:N)"); with the DERP region, the derpMap
// `relay derpmap` prints (through kubectl exec, as the README says) goes
// into the tailnet's policy, the laptops home on the in-cluster region and
// the first pong comes via DERP(tsrelay); with monitoring, the metrics
// Service answers as Prometheus would scrape it.
func TestExamples(t *testing.T) {
	kubecluster.RunForTest(t, func(t *testing.T) {
		ctx := t.Context()
		root, err := kubecluster.ModuleRoot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		assets := kubecluster.AssetsForTest(t)
		ref := manifestImage(t, filepath.Join(assets, "kubectl"), filepath.Join(root, "manifests"))
		img, err := kubecluster.RelayImage(ctx, root, t.TempDir(), ref, "cluster-test")
		if err != nil {
			t.Fatal(err)
		}
		binDir, err := tailnettest.CheckoutBinDir(ctx, "tsrelay-cluster-bin")
		if err != nil {
			t.Fatal(err)
		}
		bins, err := tailnettest.BuildClients(ctx, binDir)
		if err != nil {
			t.Fatal(err)
		}
		c := kubecluster.StartForTest(t, img)
		// The tailnet, on the internet: control, and an off-site DERP
		// region (25 ms each way) that nodes home on unless a nearer one
		// serves.
		control, err := tailnettest.StartControlWith(kubecluster.InternetIP, t.Logf, tailnettest.ControlOptions{Delay: 25 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(control.Close)
		baseDERP := control.DERPMap
		env := &testEnv{c: c, control: control, bins: bins, root: root, baseDERP: baseDERP}
		for _, ex := range examples {
			t.Run(strings.ReplaceAll(ex.dir, "/", "_"), func(t *testing.T) {
				env.run(t, ex)
			})
		}
	})
}

// testEnv is what every example shares.
type testEnv struct {
	c        *kubecluster.Cluster
	control  *tailnettest.Control
	bins     tailnettest.Binaries
	root     string
	baseDERP *tailcfg.DERPMap
	laptops  int
}

// run installs ex, checks it, and uninstalls it.
func (e *testEnv) run(t *testing.T, ex example) {
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	cs := e.c.Client
	start := time.Now()
	t.Cleanup(func() { e.uninstall(t, ex) })

	// What a user adds: the auth key, and settings for this tailnet. No
	// relay a test starts may talk to Tailscale's servers.
	if _, err := cs.CoreV1().Secrets(namespace).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "tsrelay-auth"},
		StringData: map[string]string{"TS_AUTHKEY": e.control.AuthKey},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ConfigMaps(namespace).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "tsrelay-config"},
		Data: map[string]string{
			"TS_CONTROL_URL":               e.control.URL,
			"TS_NO_LOGS_NO_SUPPORT":        "true",
			"TS_PANIC_IF_HIT_MAIN_CONTROL": "1",
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if ex.monitor {
		e.installServiceMonitorCRD(t, ctx)
	}
	out, err := e.c.Kubectl(ctx, "apply", "-k", filepath.Join(e.root, ex.dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl apply -k %s:\n%s", ex.dir, out)

	pods := e.waitReady(t, ctx, ex)
	t.Logf("%s: %d relay pod(s) Ready %.1f s after kubectl apply", ex.dir, len(pods), time.Since(start).Seconds())

	// Identities: each relay holds its state Secret and the Lease of the
	// same name.
	lbAddrs := map[netip.Addr]bool{}
	for i, pod := range pods {
		state := "tsrelay-state"
		if ex.pods != nil {
			state = pod.Name + "-state"
		}
		sec, err := cs.CoreV1().Secrets(namespace).Get(ctx, state, metav1.GetOptions{})
		if err != nil {
			t.Errorf("relay %s's state Secret: %v", pod.Name, err)
		} else if len(sec.Data) == 0 {
			t.Errorf("relay %s's state Secret %s is empty", pod.Name, state)
		}
		lease, err := cs.CoordinationV1().Leases(namespace).Get(ctx, state, metav1.GetOptions{})
		if err != nil {
			t.Errorf("relay %s's Lease: %v", pod.Name, err)
		} else if want := pod.Name + "_" + string(pod.UID); lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != want {
			t.Errorf("Lease %s held by %v, want %s", state, lease.Spec.HolderIdentity, want)
		}

		// Its Service: the load-balancer address, the relay's port (and
		// DERP's and STUN's), and this pod behind it.
		svc, err := cs.CoreV1().Services(namespace).Get(ctx, ex.services[i], metav1.GetOptions{})
		if err != nil {
			t.Fatalf("relay %s's Service: %v", pod.Name, err)
		}
		if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || len(svc.Status.LoadBalancer.Ingress) == 0 {
			t.Fatalf("Service %s: type %s, load balancer %+v; want a LoadBalancer with its address", svc.Name, svc.Spec.Type, svc.Status.LoadBalancer)
		}
		lb := netip.MustParseAddr(svc.Status.LoadBalancer.Ingress[0].IP)
		lbAddrs[lb] = true
		wantPorts := []string{"UDP/61441"}
		if ex.derp {
			wantPorts = append(wantPorts, "TCP/8443", "UDP/3478")
		}
		var ports []string
		for _, p := range svc.Spec.Ports {
			ports = append(ports, fmt.Sprintf("%s/%d", p.Protocol, p.Port))
		}
		for _, p := range wantPorts {
			if !slices.Contains(ports, p) {
				t.Errorf("Service %s ports %v, want %s among them", svc.Name, ports, p)
			}
		}
		t.Logf("relay %s: state Secret and Lease %s, Service %s at %v ports %v", pod.Name, state, svc.Name, lb, ports)
	}

	if ex.monitor {
		e.checkMonitoring(t, ctx)
	}
	var region *tailcfg.DERPRegion
	if ex.derp {
		region = e.derpRegion(t, ctx, ex, pods, lbAddrs)
	}
	e.checkRelayedPath(t, ctx, lbAddrs, region)
}

// waitReady waits until every relay pod of ex is Ready and returns them,
// in the order of ex.pods. On timeout it fails the test with each pod's
// state, its /readyz answer and the tail of its log.
func (e *testEnv) waitReady(t *testing.T, ctx context.Context, ex example) []corev1.Pod {
	t.Helper()
	want := len(ex.pods)
	if want == 0 {
		want = 1
	}
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var pods []corev1.Pod
	err := tailnettest.WaitFor(wctx, 250*time.Millisecond, func() (bool, error) {
		list, err := e.c.Client.CoreV1().Pods(namespace).List(wctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=tsrelay"})
		if err != nil {
			return false, nil
		}
		pods = nil
		for _, p := range list.Items {
			if p.DeletionTimestamp == nil {
				pods = append(pods, p)
			}
		}
		if len(pods) != want {
			return false, nil
		}
		for _, p := range pods {
			if !podReady(p) {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		var b strings.Builder
		for _, p := range pods {
			fmt.Fprintf(&b, "pod %s: phase %s, ready %v, IP %s\n", p.Name, p.Status.Phase, podReady(p), p.Status.PodIP)
			for _, cs := range p.Status.ContainerStatuses {
				fmt.Fprintf(&b, "  container %s: ready %v, restarts %d, state %+v\n", cs.Name, cs.Ready, cs.RestartCount, cs.State)
			}
			if p.Status.PodIP != "" {
				code, body, err := e.podGet(ctx, p.Status.PodIP, "/readyz")
				fmt.Fprintf(&b, "  GET /readyz: %d %v %s\n", code, err, body)
			}
			out, _ := e.c.Kubectl(ctx, "-n", namespace, "logs", "--tail=20", p.Name)
			fmt.Fprintf(&b, "  log tail:\n%s\n", out)
		}
		t.Fatalf("%s: want %d relay pod(s) Ready: %v\n%s", ex.dir, want, err, b.String())
	}
	if ex.pods != nil {
		slices.SortFunc(pods, func(a, b corev1.Pod) int { return strings.Compare(a.Name, b.Name) })
		var names []string
		for _, p := range pods {
			names = append(names, p.Name)
		}
		if !slices.Equal(names, ex.pods) {
			t.Fatalf("relay pods %v, want %v", names, ex.pods)
		}
	}
	return pods
}

func podReady(p corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podGet fetches path from a relay pod's HTTP port (9002) from the node,
// as the kubelet's probes do.
func (e *testEnv) podGet(ctx context.Context, podIP, path string) (int, string, error) {
	return e.nodeGet(ctx, net.JoinHostPort(podIP, "9002"), path)
}

// nodeGet fetches http://addr/path from the node's network namespace.
func (e *testEnv) nodeGet(ctx context.Context, addr, path string) (int, string, error) {
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
			return tailnettest.DialInNetns(ctx, e.c.NodeNetns, network, a)
		}},
	}
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

// derpRegion reads the region the relays serve with `relay derpmap`
// through kubectl exec, as the README tells users to, checks it names each
// relay's load-balancer address with the Service's DERP and STUN ports,
// and puts it into the tailnet's derpMap beside the off-site region.
func (e *testEnv) derpRegion(t *testing.T, ctx context.Context, ex example, pods []corev1.Pod, lbAddrs map[netip.Addr]bool) *tailcfg.DERPRegion {
	t.Helper()
	target := "deploy/tsrelay"
	if ex.pods != nil {
		target = ex.pods[0]
	}
	out, err := e.c.Kubectl(ctx, "-n", namespace, "exec", target, "--", "/relay", "derpmap")
	if err != nil {
		t.Fatal(err)
	}
	var dm tailcfg.DERPMap
	if err := json.Unmarshal(out, &dm); err != nil {
		t.Fatalf("kubectl exec %s -- /relay derpmap: %v\n%s", target, err, out)
	}
	region := dm.Regions[derpregion.DefaultRegionID]
	if region == nil || len(dm.Regions) != 1 {
		t.Fatalf("relay derpmap printed %s, want region %d only", out, derpregion.DefaultRegionID)
	}
	var nodeIPs []string
	for _, n := range region.Nodes {
		nodeIPs = append(nodeIPs, n.IPv4)
		if n.DERPPort != 8443 || n.STUNPort != 3478 {
			t.Errorf("derpMap node %s: DERP port %d, STUN port %d; want the Service's 8443 and 3478", n.Name, n.DERPPort, n.STUNPort)
		}
	}
	var want []string
	for a := range lbAddrs {
		want = append(want, a.String())
	}
	slices.Sort(want)
	slices.Sort(nodeIPs)
	if !slices.Equal(nodeIPs, want) {
		t.Errorf("derpMap nodes at %v, want one at each load-balancer address %v", nodeIPs, want)
	}
	t.Logf("relay derpmap: region %d (%s), nodes at %v", region.RegionID, region.RegionCode, nodeIPs)

	// With a mesh, each replica's /readyz shows its link to the other up.
	if len(pods) > 1 {
		for _, p := range pods {
			var last string
			err := tailnettest.WaitFor(ctx, 250*time.Millisecond, func() (bool, error) {
				_, body, err := e.podGet(ctx, p.Status.PodIP, "/readyz?verbose")
				if err != nil {
					last = err.Error()
					return false, nil
				}
				var st readyz.Status
				if err := json.Unmarshal([]byte(body), &st); err != nil || st.DERP == nil {
					last = body
					return false, nil
				}
				connected := 0
				for _, mp := range st.DERP.MeshPeers {
					if mp.Connected {
						connected++
					}
				}
				last = fmt.Sprintf("%+v", st.DERP.MeshPeers)
				return connected == len(pods)-1 && len(st.DERP.MeshPeers) == len(pods)-1, nil
			})
			if err != nil {
				t.Errorf("relay %s: DERP mesh links %s; want its %d peer(s) connected: %v", p.Name, last, len(pods)-1, err)
			}
		}
	}

	// The user pastes it into the policy file.
	m := &tailcfg.DERPMap{Regions: maps.Clone(e.baseDERP.Regions)}
	m.Regions[region.RegionID] = region
	e.control.SetDERPMap(m)
	return region
}

// checkMonitoring checks the ServiceMonitor and scrapes the relay through
// the tsrelay-metrics Service, as Prometheus would.
func (e *testEnv) checkMonitoring(t *testing.T, ctx context.Context) {
	t.Helper()
	dc, err := dynamic.NewForConfig(e.c.API.Admin)
	if err != nil {
		t.Fatal(err)
	}
	smGVR := schema.GroupVersionResource{Group: "monitoring.coreos.com", Version: "v1", Resource: "servicemonitors"}
	sms, err := dc.Resource(smGVR).Namespace(namespace).List(ctx, metav1.ListOptions{})
	if err != nil || len(sms.Items) == 0 {
		t.Fatalf("ServiceMonitors in %s: %v (err %v), want the example's", namespace, sms, err)
	}
	svc, err := e.c.Client.CoreV1().Services(namespace).Get(ctx, "tsrelay-metrics", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort(svc.Spec.ClusterIP, "9002")
	var body string
	err = tailnettest.WaitFor(ctx, 250*time.Millisecond, func() (bool, error) {
		code, b, err := e.nodeGet(ctx, addr, "/metrics")
		body = b
		return err == nil && code == http.StatusOK && regexp.MustCompile(`(?m)^tsrelay_ready 1$`).MatchString(b), nil
	})
	if err != nil {
		t.Fatalf("GET http://%s/metrics (Service tsrelay-metrics): no tsrelay_ready 1: %v\n%.2000s", addr, err, body)
	}
	t.Logf("scraped tsrelay_ready 1 through Service tsrelay-metrics at %s", addr)
}

// installServiceMonitorCRD installs a minimal ServiceMonitor CRD (the
// Prometheus Operator's kind, with its schema left open), as a cluster
// running the operator has.
func (e *testEnv) installServiceMonitorCRD(t *testing.T, ctx context.Context) {
	t.Helper()
	crd := filepath.Join(t.TempDir(), "servicemonitor-crd.yaml")
	if err := os.WriteFile(crd, []byte(serviceMonitorCRD), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Kubectl(ctx, "apply", "-f", crd); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Kubectl(ctx, "wait", "--for=condition=Established", "--timeout=60s", "crd/servicemonitors.monitoring.coreos.com"); err != nil {
		t.Fatal(err)
	}
}

const serviceMonitorCRD = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names:
    kind: ServiceMonitor
    listKind: ServiceMonitorList
    plural: servicemonitors
    singular: servicemonitor
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
`

// checkRelayedPath starts two laptops on the internet that may not talk to
// each other directly and checks that a's pings to b move onto a relay, at
// one of lbAddrs. With region (the in-cluster DERP region), both laptops
// must first home on it, and the first pong come through it.
func (e *testEnv) checkRelayedPath(t *testing.T, ctx context.Context, lbAddrs map[netip.Addr]bool, region *tailcfg.DERPRegion) {
	t.Helper()
	a := e.laptop(t, ctx)
	b := e.laptop(t, ctx)
	ipB := tailnettest.UpForTest(t, e.control, b)
	tailnettest.UpForTest(t, e.control, a)
	if err := a.WaitForPeer(ctx, ipB); err != nil {
		t.Fatal(err)
	}
	if region != nil {
		var homeA, homeB string
		wctx, cancel := context.WithTimeout(ctx, 90*time.Second)
		defer cancel()
		err := tailnettest.WaitFor(wctx, 200*time.Millisecond, func() (bool, error) {
			s, err := a.LocalClient().Status(wctx)
			if err != nil {
				return false, nil
			}
			homeA = s.Self.Relay
			if p, ok := peerByIP(s, ipB); ok {
				homeB = p.Relay
			}
			return homeA == region.RegionCode && homeB == region.RegionCode, nil
		})
		if err != nil {
			t.Fatalf("home DERP regions: a %q, b %q (as a sees it); want both %q: %v", homeA, homeB, region.RegionCode, err)
		}
	}
	var addrs []string
	for a := range lbAddrs {
		addrs = append(addrs, regexp.QuoteMeta(a.String()))
	}
	relayed := regexp.MustCompile(`via peer-relay\((` + strings.Join(addrs, "|") + `):` + strconv.Itoa(relayPort) + `:vni:\d+\)`)
	// Relay-path discovery may miss the first round of pings on a busy
	// machine; it runs again within 30 s.
	var out []byte
	for try := 0; try < 3; try++ {
		var err error
		out, err = a.CLI(ctx, "ping", "--c=10", "--until-direct=false", ipB.String())
		if err != nil {
			t.Fatalf("tailscale ping: %v", err)
		}
		t.Logf("tailscale ping from a to b:\n%s", out)
		if try == 0 && region != nil {
			first, _, _ := strings.Cut(string(out), "\n")
			if want := "via DERP(" + region.RegionCode + ")"; !strings.Contains(first, want) {
				t.Errorf("first pong %q, want it %s", first, want)
			}
		}
		if relayed.Match(out) {
			return
		}
	}
	t.Fatalf("no pong %s in three rounds of tailscale ping", relayed)
}

// laptop starts a tailscaled laptop in a host namespace of its own on the
// internet, never using direct UDP.
func (e *testEnv) laptop(t *testing.T, ctx context.Context) *tailnettest.Laptop {
	t.Helper()
	e.laptops++
	name := "l" + strconv.Itoa(e.laptops)
	ns, _, err := e.c.Host(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	lctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	l, err := tailnettest.StartLaptopWith(lctx, e.bins, filepath.Join(t.TempDir(), name), name, tailnettest.LaptopOptions{Netns: ns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s's tailscaled log tail:\n%s", name, l.LogTail(40))
		}
		l.Close()
	})
	return l
}

// uninstall deletes what the example and the user added, the relays'
// state and Leases included, so that the next example starts afresh, and
// takes the in-cluster region out of the tailnet's derpMap.
func (e *testEnv) uninstall(t *testing.T, ex example) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if t.Failed() {
		out, _ := e.c.Kubectl(ctx, "-n", namespace, "get", "all", "-o", "wide")
		events, _ := e.c.Kubectl(ctx, "-n", namespace, "get", "events", "--field-selector=type=Warning")
		t.Logf("kube-public at failure:\n%s\nWarning events:\n%s", out, events)
	}
	if out, err := e.c.Kubectl(ctx, "delete", "-k", filepath.Join(e.root, ex.dir), "--wait=true", "--ignore-not-found"); err != nil {
		t.Errorf("%v", err)
	} else {
		t.Logf("kubectl delete -k %s:\n%s", ex.dir, out)
	}
	cs := e.c.Client
	err := tailnettest.WaitFor(ctx, 250*time.Millisecond, func() (bool, error) {
		list, err := cs.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=tsrelay"})
		return err == nil && len(list.Items) == 0, nil
	})
	if err != nil {
		t.Errorf("relay pods still there after kubectl delete: %v", err)
	}
	del := func(err error) {
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("clean up: %v", err)
		}
	}
	del(cs.CoreV1().Secrets(namespace).Delete(ctx, "tsrelay-auth", metav1.DeleteOptions{}))
	del(cs.CoreV1().ConfigMaps(namespace).Delete(ctx, "tsrelay-config", metav1.DeleteOptions{}))
	for _, name := range []string{"tsrelay-state", "tsrelay-0-state", "tsrelay-1-state", "tsrelay-derp-mesh"} {
		del(cs.CoreV1().Secrets(namespace).Delete(ctx, name, metav1.DeleteOptions{}))
		del(cs.CoordinationV1().Leases(namespace).Delete(ctx, name, metav1.DeleteOptions{}))
	}
	if ex.derp {
		e.control.SetDERPMap(e.baseDERP)
	}
}

// manifestImage returns the relay image the base manifests name, rendered
// with kubectl kustomize.
func manifestImage(t *testing.T, kubectl, dir string) string {
	t.Helper()
	out, err := execOutput(t.Context(), kubectl, "kustomize", dir)
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, out)
	}
	m := regexp.MustCompile(`(?m)^\s+image: (\S+)$`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no image in kubectl kustomize %s", dir)
	}
	return string(m[1])
}

func peerByIP(st *ipnstate.Status, ip netip.Addr) (*ipnstate.PeerStatus, bool) {
	for _, p := range st.Peer {
		if slices.Contains(p.TailscaleIPs, ip) {
			return p, true
		}
	}
	return nil, false
}
