//go:build linux

package cluster_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
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

// relayPort is the relay's UDP port in the manifests.
const relayPort = 61441

// example is one shipped kustomization and what it must give.
type example struct {
	dir string // under the module root
	// namespace is where it installs the relay.
	namespace string
	// namespaceFile, under dir, is the example's own Namespace, which the
	// test applies first so that the user's Secret and ConfigMap can go
	// in it; empty for an existing namespace.
	namespaceFile string
	// pods are the relay pods' names for a StatefulSet; empty means the
	// Deployment's one pod.
	pods []string
	// services are the LoadBalancer Services, in the order of pods.
	services []string
	derp     bool // serves the in-cluster DERP region
	monitor  bool // has a ServiceMonitor and the tsrelay-metrics Service
	// keyless logs in with its pod's ServiceAccount token
	// (components/keyless), with no auth key in the cluster.
	keyless bool
}

// ha is the StatefulSet's relays and Services.
var (
	haPods     = []string{"tsrelay-0", "tsrelay-1"}
	haServices = []string{"tsrelay-0", "tsrelay-1"}
)

// examples are every kustomization the project ships, in the order the
// test applies them.
var examples = []example{
	{dir: "manifests", namespace: kubePublic, services: []string{"tsrelay"}},
	{dir: "examples/monitoring", namespace: kubePublic, services: []string{"tsrelay"}, monitor: true},
	{dir: "examples/derp", namespace: kubePublic, services: []string{"tsrelay"}, derp: true},
	{dir: "examples/ha", namespace: kubePublic, pods: haPods, services: haServices},
	{dir: "examples/ha-derp", namespace: kubePublic, pods: haPods, services: haServices, derp: true},
	{dir: "examples/namespace", namespace: "tsrelay", namespaceFile: "namespace.yaml", services: []string{"tsrelay"}},
	{dir: "examples/keyless", namespace: kubePublic, services: []string{"tsrelay"}, keyless: true},
}

// TestExamplesTableComplete checks that examples lists the base and every
// directory under examples/, so that a new example cannot ship without
// the real-cluster test applying it.
func TestExamplesTableComplete(t *testing.T) {
	entries, err := os.ReadDir("../examples")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"manifests"}
	for _, e := range entries {
		if e.IsDir() {
			want = append(want, "examples/"+e.Name())
		}
	}
	var got []string
	for _, ex := range examples {
		got = append(got, ex.dir)
	}
	slices.Sort(want)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("TestExamples applies %v; the shipped examples are %v", got, want)
	}
}

// kubePublic is the namespace the base manifests install into.
const kubePublic = metav1.NamespacePublic

// What examples/keyless's user sets up in the admin console: a trusted
// credential with this client ID, audience and tag, for the subject
// system:serviceaccount:<namespace>:tsrelay and the cluster's issuer.
const (
	keylessClientID = "kTSRELAYTEST11CNTRL"
	keylessAudience = "api.tailscale.test/kTSRELAYTEST11CNTRL"
	keylessTag      = "tag:relay"
)

// TestExamples applies every shipped example with `kubectl apply -k`, the
// kubectl users have (built from the Kubernetes release the project
// follows), to a real single-node cluster (internal/kubecluster) running
// the relay image built from this checkout as the Dockerfile builds it.
// The only additions are what a user adds: the tsrelay-auth Secret and the
// tsrelay-config ConfigMap, pointing the relay at the test's tailnet, in
// the example's namespace (examples/namespace's own, applied first). With
// examples/keyless there is no auth key: the ConfigMap holds the trusted
// credential's client ID and tag, the audience is patched in as README's
// "Keyless login" says, the API server's discovery endpoints are opened
// to anyone as it says, and the test control's token exchange verifies
// the token the kubelet projects against the cluster's own issuer; the
// relay must log in once, asking for a non-ephemeral, preauthorized key.
// For each example: every relay pod becomes Ready; each relay holds its
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
	ns := ex.namespace
	start := time.Now()
	kustomization := filepath.Join(e.root, ex.dir)
	if ex.keyless {
		kustomization = keylessOverlay(t, kustomization)
	}
	t.Cleanup(func() { e.uninstall(t, ex, kustomization) })

	if ex.namespaceFile != "" {
		out, err := e.c.Kubectl(ctx, "apply", "-f", filepath.Join(e.root, ex.dir, ex.namespaceFile))
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("kubectl apply -f %s: %s", filepath.Join(ex.dir, ex.namespaceFile), out)
	}
	var exchange *tailnettest.TokenExchange
	if ex.keyless {
		exchange = e.trustIssuer(t, ctx, ns)
	}

	// What a user adds: the auth key (or, keyless, the credential's client
	// ID and tag), and settings for this tailnet. No relay a test starts
	// may talk to Tailscale's servers.
	config := map[string]string{
		"TS_CONTROL_URL":               e.control.URL,
		"TS_NO_LOGS_NO_SUPPORT":        "true",
		"TS_PANIC_IF_HIT_MAIN_CONTROL": "1",
	}
	if ex.keyless {
		config["TS_CLIENT_ID"] = keylessClientID
		config["TS_ADVERTISE_TAGS"] = keylessTag
	} else if _, err := cs.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "tsrelay-auth"},
		StringData: map[string]string{"TS_AUTHKEY": e.control.AuthKey},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "tsrelay-config"},
		Data:       config,
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if ex.monitor {
		e.installServiceMonitorCRD(t, ctx)
	}
	out, err := e.c.Kubectl(ctx, "apply", "-k", kustomization)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl apply -k %s:\n%s", kustomization, out)

	pods := e.waitReady(t, ctx, ex)
	t.Logf("%s: %d relay pod(s) Ready %.1f s after kubectl apply", ex.dir, len(pods), time.Since(start).Seconds())
	if ex.keyless {
		checkKeylessLogin(t, exchange, len(pods))
	}
	if ns != kubePublic {
		e.checkMoved(t, ctx, ns)
	}

	// Identities: each relay holds its state Secret and the Lease of the
	// same name.
	lbAddrs := map[netip.Addr]bool{}
	for i, pod := range pods {
		state := "tsrelay-state"
		if ex.pods != nil {
			state = pod.Name + "-state"
		}
		sec, err := cs.CoreV1().Secrets(ns).Get(ctx, state, metav1.GetOptions{})
		if err != nil {
			t.Errorf("relay %s's state Secret: %v", pod.Name, err)
		} else if len(sec.Data) == 0 {
			t.Errorf("relay %s's state Secret %s is empty", pod.Name, state)
		}
		lease, err := cs.CoordinationV1().Leases(ns).Get(ctx, state, metav1.GetOptions{})
		if err != nil {
			t.Errorf("relay %s's Lease: %v", pod.Name, err)
		} else if want := pod.Name + "_" + string(pod.UID); lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != want {
			t.Errorf("Lease %s held by %v, want %s", state, lease.Spec.HolderIdentity, want)
		}

		// Its Service: the load-balancer address, the relay's port (and
		// DERP's and STUN's), and this pod behind it.
		svc, err := cs.CoreV1().Services(ns).Get(ctx, ex.services[i], metav1.GetOptions{})
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
		e.checkMonitoring(t, ctx, ns)
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
		list, err := e.c.Client.CoreV1().Pods(ex.namespace).List(wctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=tsrelay"})
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
			out, _ := e.c.Kubectl(ctx, "-n", ex.namespace, "logs", "--tail=20", p.Name)
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
	out, err := e.c.Kubectl(ctx, "-n", ex.namespace, "exec", target, "--", "/relay", "derpmap")
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

// checkMonitoring checks the ServiceMonitor in namespace and scrapes the
// relay through the tsrelay-metrics Service, as Prometheus would.
func (e *testEnv) checkMonitoring(t *testing.T, ctx context.Context, namespace string) {
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

// uninstall deletes what the example (installed from kustomization) and
// the user added, the relays' state and Leases included, so that the next
// example starts afresh, and takes the in-cluster region out of the
// tailnet's derpMap. An example's own namespace goes with the example.
func (e *testEnv) uninstall(t *testing.T, ex example, kustomization string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ns := ex.namespace
	if t.Failed() {
		out, _ := e.c.Kubectl(ctx, "-n", ns, "get", "all", "-o", "wide")
		events, _ := e.c.Kubectl(ctx, "-n", ns, "get", "events", "--field-selector=type=Warning")
		// The relays' own view: a path that never moved onto a relay is
		// told apart from the laptops' side only here.
		logs, _ := e.c.Kubectl(ctx, "-n", ns, "logs", "-l", "app.kubernetes.io/name=tsrelay", "--prefix", "--tail=40")
		t.Logf("%s at failure:\n%s\nWarning events:\n%s\nRelay logs:\n%s", ns, out, events, logs)
	}
	if out, err := e.c.Kubectl(ctx, "delete", "-k", kustomization, "--wait=true", "--ignore-not-found"); err != nil {
		t.Errorf("%v", err)
	} else {
		t.Logf("kubectl delete -k %s:\n%s", kustomization, out)
	}
	cs := e.c.Client
	err := tailnettest.WaitFor(ctx, 250*time.Millisecond, func() (bool, error) {
		list, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=tsrelay"})
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
	del(cs.CoreV1().Secrets(ns).Delete(ctx, "tsrelay-auth", metav1.DeleteOptions{}))
	del(cs.CoreV1().ConfigMaps(ns).Delete(ctx, "tsrelay-config", metav1.DeleteOptions{}))
	for _, name := range []string{"tsrelay-state", "tsrelay-0-state", "tsrelay-1-state", "tsrelay-derp-mesh"} {
		del(cs.CoreV1().Secrets(ns).Delete(ctx, name, metav1.DeleteOptions{}))
		del(cs.CoordinationV1().Leases(ns).Delete(ctx, name, metav1.DeleteOptions{}))
	}
	if ex.keyless {
		del(cs.RbacV1().ClusterRoleBindings().Delete(ctx, oidcDiscoveryBinding, metav1.DeleteOptions{}))
	}
	if ex.derp {
		e.control.SetDERPMap(e.baseDERP)
	}
}

// checkMoved checks that an example installing into ns moved everything
// there: the RoleBinding grants its Role to the ServiceAccount in ns, and
// none of the relay's objects is in kube-public.
func (e *testEnv) checkMoved(t *testing.T, ctx context.Context, ns string) {
	t.Helper()
	cs := e.c.Client
	rb, err := cs.RbacV1().RoleBindings(ns).Get(ctx, "tsrelay", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range rb.Subjects {
		if s.Kind == "ServiceAccount" && s.Namespace != ns {
			t.Errorf("RoleBinding %s/tsrelay grants to ServiceAccount %s/%s, want it in %s", ns, s.Namespace, s.Name, ns)
		}
	}
	gone := func(what string, err error) {
		if !apierrors.IsNotFound(err) {
			t.Errorf("%s in %s: %v, want none there", what, kubePublic, err)
		}
	}
	_, err = cs.CoreV1().ServiceAccounts(kubePublic).Get(ctx, "tsrelay", metav1.GetOptions{})
	gone("ServiceAccount tsrelay", err)
	_, err = cs.RbacV1().Roles(kubePublic).Get(ctx, "tsrelay", metav1.GetOptions{})
	gone("Role tsrelay", err)
	_, err = cs.RbacV1().RoleBindings(kubePublic).Get(ctx, "tsrelay", metav1.GetOptions{})
	gone("RoleBinding tsrelay", err)
	_, err = cs.AppsV1().Deployments(kubePublic).Get(ctx, "tsrelay", metav1.GetOptions{})
	gone("Deployment tsrelay", err)
	_, err = cs.CoreV1().Services(kubePublic).Get(ctx, "tsrelay", metav1.GetOptions{})
	gone("Service tsrelay", err)
	_, err = cs.CoreV1().Secrets(kubePublic).Get(ctx, "tsrelay-state", metav1.GetOptions{})
	gone("Secret tsrelay-state", err)
	_, err = cs.CoordinationV1().Leases(kubePublic).Get(ctx, "tsrelay-state", metav1.GetOptions{})
	gone("Lease tsrelay-state", err)
}

// oidcDiscoveryBinding is the ClusterRoleBinding README's "Keyless login"
// has users create so that anyone may read the issuer's discovery
// document and keys.
const oidcDiscoveryBinding = "oidc-discovery"

// keylessOverlay writes, in a temporary directory, the kustomization a
// user of examples/keyless (at dir) applies: the example with the
// projected token's audience patched to the trusted credential's, as the
// example and README's "Keyless login" say (the example's audience is a
// stand-in for the one the admin console shows). The patch is the
// example's own, with only the audience changed. It returns the
// directory.
func keylessOverlay(t *testing.T, dir string) string {
	t.Helper()
	overlay := t.TempDir()
	// kustomize takes no absolute path to a kustomization directory.
	rel, err := filepath.Rel(overlay, dir)
	if err != nil {
		t.Fatal(err)
	}
	k := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- %s
patches:
- patch: |-
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: tsrelay
    spec:
      template:
        spec:
          volumes:
            - name: tailscale-token
              projected:
                sources:
                  - serviceAccountToken:
                      path: token
                      audience: %s
                      expirationSeconds: 3600
`, filepath.ToSlash(rel), keylessAudience)
	if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	return overlay
}

// trustIssuer does what README's "Keyless login" asks of a user before
// installing: it reads the cluster's issuer with `kubectl get --raw
// /.well-known/openid-configuration`, lets anyone read the discovery
// document and keys (the oidc-discovery ClusterRoleBinding), and adds a
// trusted credential for it: a token exchange on the test control that
// fetches them from the issuer with no credentials and trusting only the
// API server's CA, as Tailscale's servers would over the internet, and
// accepts the ServiceAccount tsrelay in namespace with the credential's
// audience and tag. It returns the token exchange.
func (e *testEnv) trustIssuer(t *testing.T, ctx context.Context, namespace string) *tailnettest.TokenExchange {
	t.Helper()
	out, err := e.c.Kubectl(ctx, "get", "--raw", "/.well-known/openid-configuration")
	if err != nil {
		t.Fatal(err)
	}
	var disc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.Unmarshal(out, &disc); err != nil || disc.Issuer == "" {
		t.Fatalf("kubectl get --raw /.well-known/openid-configuration: %v\n%s", err, out)
	}
	if _, err := e.c.Kubectl(ctx, "create", "clusterrolebinding", oidcDiscoveryBinding,
		"--clusterrole=system:service-account-issuer-discovery", "--group=system:unauthenticated"); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(e.c.API.CA) {
		t.Fatal("no certificate in the API server's CA")
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	// Both documents readable without credentials (the binding is in
	// force once the authorizer's cache has it).
	var last string
	err = tailnettest.WaitFor(ctx, 250*time.Millisecond, func() (bool, error) {
		for _, u := range []string{disc.Issuer + "/.well-known/openid-configuration", disc.JWKSURI} {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
			if err != nil {
				return false, err
			}
			resp, err := client.Do(req)
			if err != nil {
				last = err.Error()
				return false, nil
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				last = fmt.Sprintf("GET %s: %s", u, resp.Status)
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("the issuer's discovery document and keys are not readable anonymously: %s: %v", last, err)
	}
	exchange := &tailnettest.TokenExchange{
		ClientID:   keylessClientID,
		Issuer:     disc.Issuer,
		Subject:    "system:serviceaccount:" + namespace + ":tsrelay",
		Audience:   keylessAudience,
		Tags:       []string{keylessTag},
		AuthKey:    e.control.AuthKey,
		HTTPClient: client,
	}
	e.control.SetAPI(exchange)
	t.Logf("trusted credential %s: issuer %s (keys at %s), subject %s, audience %s", keylessClientID, disc.Issuer, disc.JWKSURI, exchange.Subject, keylessAudience)
	return exchange
}

// checkKeylessLogin checks that each of n relays logged in through the
// token exchange exactly once, with no refusal, and asked for a
// single-use key for a node that is not ephemeral, is preauthorized and
// carries the credential's tag.
func checkKeylessLogin(t *testing.T, exchange *tailnettest.TokenExchange, n int) {
	t.Helper()
	if r := exchange.Refusals(); len(r) != 0 {
		t.Errorf("token exchange refused %d time(s): %q", len(r), r)
	}
	if got := exchange.Exchanges(); got != n {
		t.Errorf("%d token exchange(s), want %d (one per relay)", got, n)
	}
	keys := exchange.Keys()
	if len(keys) != n {
		t.Fatalf("key requests %+v, want %d", keys, n)
	}
	for _, k := range keys {
		if k.Ephemeral || !k.Preauthorized || k.Reusable || !slices.Equal(k.Tags, []string{keylessTag}) {
			t.Errorf("key request %+v, want a single-use, non-ephemeral, preauthorized key tagged %s", k, keylessTag)
		}
	}
	t.Logf("keyless login: %d token exchange(s), key requests %+v", exchange.Exchanges(), keys)
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
