//go:build linux

// Package kubecluster runs a whole single-node Kubernetes cluster for the
// real-cluster test (cluster/): etcd and kube-apiserver (internal/kubetest),
// containerd with runc and the CNI bridge plugin, kubelet, kube-proxy in
// iptables mode, kube-scheduler and kube-controller-manager, and a
// load-balancer controller of its own that gives LoadBalancer Services an
// address routed to the node, as MetalLB would.
//
// Everything runs in namespaces the test makes: RunForTest re-runs the test
// in new network and mount namespaces and a cgroup of its own, so the
// cluster's interfaces, iptables rules, mounts and processes vanish with
// it. The test's own network namespace is the "internet": a bridge, world,
// on 10.88.0.1/16, where the test serves its tailnet (control, DERP, STUN)
// and where hosts (laptops) plug in (Host). The node is the network
// namespace tsrelay-node on the world at 10.88.0.2, with pods behind it on
// 10.244.0.0/24 (masqueraded), and load-balancer addresses routed to it.
//
// The binaries come from scripts/kube-cluster-bins, which `make test` runs:
// containerd, runc and the CNI plugins from Debian's packages, and the
// Kubernetes programs built from the k8s.io/kubernetes module once per
// machine. Nothing is pulled from a registry: the pod sandbox image is
// built here (./pause), and images are imported into containerd from
// docker-archive tars (WriteDockerArchive, RelayImage).
package kubecluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tsrelay/tsrelay/internal/cmdline"
	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// NodeName is the cluster's one node.
const NodeName = "tsrelay-node"

// The address plan. The test process's network namespace is the internet.
var (
	// InternetIP is the test process's address on the world bridge, where
	// it serves the tailnet.
	InternetIP = netip.MustParseAddr("10.88.0.1")
	// NodeIP is the node's address on the world; the API server listens on
	// it, port 6443.
	NodeIP = netip.MustParseAddr("10.88.0.2")
	// LBPool holds the addresses the load-balancer controller gives
	// Services that ask for none.
	LBPool = netip.MustParsePrefix("10.89.0.0/24")
)

const (
	worldBridge = "world"
	worldPrefix = 16
	nodeNetns   = "tsrelay-node"
	podSubnet   = "10.244.0.0/24"
	clusterCIDR = "10.244.0.0/16"
	pauseRef    = "tsrelay.test/pause:1"
	// startTimeout bounds Start on a busy 2-core machine; the cluster
	// is up in about 20 s on an idle one.
	startTimeout = 4 * time.Minute
)

// Options configure Start.
type Options struct {
	// Assets is the directory scripts/kube-cluster-bins prints.
	Assets string
	// Dir holds the cluster's data, configuration and logs.
	Dir string
	// CgroupRoot is the cgroup (v1: in every mounted hierarchy) that the
	// cluster's pods go under, made by RunForTest.
	CgroupRoot string
	// Images are imported into containerd before the kubelet starts.
	Images []Image
	// Log receives the harness's progress.
	Log *slog.Logger
}

// Cluster is a running single-node cluster.
type Cluster struct {
	// API is the control plane; API.Admin is a cluster-admin client config.
	API *kubetest.Server
	// Client is a typed client acting as a cluster admin.
	Client kubernetes.Interface
	// Kubeconfig is an admin kubeconfig file, for kubectl.
	Kubeconfig string
	// KubectlPath is the kubectl binary.
	KubectlPath string
	// NodeNetns is the node's network namespace (`ip netns` name).
	NodeNetns string

	opts      Options
	procs     []*tailnettest.Process // in start order
	sock      string                 // containerd's socket
	cancel    context.CancelFunc     // stops the load-balancer controller
	lbDone    chan struct{}
	mu        sync.Mutex // guards hosts, lbIPs and lbNext
	hosts     int
	lbIPs     map[netip.Addr]string // address -> namespace/name
	lbNext    netip.Addr
	closeOnce sync.Once
}

// Start starts the cluster and returns once the node is Ready. It must run
// in the process RunForTest started (it changes this network namespace).
// The caller must Close the cluster.
func Start(ctx context.Context, opts Options) (_ *Cluster, err error) {
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	c := &Cluster{
		opts:        opts,
		NodeNetns:   nodeNetns,
		KubectlPath: filepath.Join(opts.Assets, "kubectl"),
		lbIPs:       map[netip.Addr]string{},
		lbNext:      netip.AddrFrom4([4]byte{10, 89, 0, 10}),
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if !strings.HasPrefix(opts.CgroupRoot, "/") || opts.CgroupRoot == "/" {
		return nil, fmt.Errorf("start the cluster: CgroupRoot %q is not a cgroup of its own, such as /tsrelay-cluster-1234 (RunForTest makes one)", opts.CgroupRoot)
	}
	for _, bin := range []string{"kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kubectl", "containerd", "ctr"} {
		if _, err := os.Stat(filepath.Join(opts.Assets, bin)); err != nil {
			return nil, fmt.Errorf("no %s in %s: run scripts/kube-cluster-bins and set %s to the directory it prints", bin, opts.Assets, kubetest.AssetsEnv)
		}
	}
	if err := c.network(ctx); err != nil {
		return nil, err
	}
	netnsPath := "/run/netns/" + nodeNetns

	kc, err := writeKubeletClientPKI(filepath.Join(opts.Dir, "pki"))
	if err != nil {
		return nil, err
	}
	opts.Log.Info("starting etcd and kube-apiserver")
	c.API, err = kubetest.StartWith(ctx, opts.Assets, mkdir(opts.Dir, "api"), kubetest.Options{
		NetnsPath: netnsPath,
		Address:   NodeIP,
		Args: []string{
			"--kubelet-client-certificate=" + kc.clientCert,
			"--kubelet-client-key=" + kc.clientKey,
			"--kubelet-preferred-address-types=InternalIP,Hostname",
		},
	})
	if err != nil {
		return nil, err
	}
	c.Kubeconfig = filepath.Join(opts.Dir, "admin.kubeconfig")
	if err := c.API.WriteKubeconfig(c.Kubeconfig, c.API.Admin.BearerToken, ""); err != nil {
		return nil, err
	}
	c.Client, err = kubernetes.NewForConfig(c.API.Admin)
	if err != nil {
		return nil, fmt.Errorf("admin client: %w", err)
	}

	if err := c.startContainerd(ctx, netnsPath); err != nil {
		return nil, err
	}
	pause, err := pauseImage(ctx, mkdir(opts.Dir, "bin"))
	if err != nil {
		return nil, err
	}
	for _, img := range append([]Image{pause}, opts.Images...) {
		if err := c.importImage(ctx, img); err != nil {
			return nil, err
		}
	}
	opts.Log.Info("starting kubelet, kube-proxy, kube-scheduler and kube-controller-manager")
	if err := c.startNode(ctx, netnsPath, kc.caFile); err != nil {
		return nil, err
	}
	if err := c.waitNodeReady(ctx); err != nil {
		return nil, err
	}
	lbCtx, lbCancel := context.WithCancel(context.Background())
	c.cancel, c.lbDone = lbCancel, make(chan struct{})
	go func() {
		defer close(c.lbDone)
		c.runLoadBalancer(lbCtx)
	}()
	opts.Log.Info("cluster ready")
	return c, nil
}

// network makes the world bridge in this namespace, the internet, and the
// node's namespace on it.
func (c *Cluster) network(ctx context.Context) error {
	node := "ip -n " + nodeNetns + " "
	return cmdline.Run(ctx,
		"ip link set lo up",
		"ip link add "+worldBridge+" type bridge",
		fmt.Sprintf("ip addr add %v/%d dev %s", InternetIP, worldPrefix, worldBridge),
		"ip link set "+worldBridge+" up",
		// The internet routes: hosts reach load-balancer addresses
		// through it.
		"sysctl -qw net.ipv4.ip_forward=1",
		"ip netns add "+nodeNetns,
		"ip link add node0 type veth peer name eth0 netns "+nodeNetns,
		"ip link set node0 master "+worldBridge+" up",
		node+"link set lo up",
		fmt.Sprintf("%saddr add %v/%d dev eth0", node, NodeIP, worldPrefix),
		node+"link set eth0 up",
		fmt.Sprintf("%sroute add default via %v", node, InternetIP),
		"ip netns exec "+nodeNetns+" sysctl -qw net.ipv4.ip_forward=1",
		fmt.Sprintf("ip route add %v via %v", LBPool, NodeIP),
	)
}

// Host makes a network namespace for a host on the world (a laptop), with
// its default route through the internet, and returns its name and
// address. It goes when the test's namespaces go.
func (c *Cluster) Host(ctx context.Context, name string) (netns string, addr netip.Addr, err error) {
	c.mu.Lock()
	c.hosts++
	n := c.hosts
	c.mu.Unlock()
	netns = "host-" + name
	addr = netip.AddrFrom4([4]byte{10, 88, 1, byte(n)})
	veth := fmt.Sprintf("h%d", n)
	err = cmdline.Run(ctx, cmdline.JoinBridge(netns, veth, worldBridge, addr, worldPrefix, InternetIP)...)
	return netns, addr, err
}

// startContainerd writes containerd's configuration and the CNI network
// and starts containerd in the node's namespace.
func (c *Cluster) startContainerd(ctx context.Context, netnsPath string) error {
	dir := mkdir(c.opts.Dir, "containerd")
	cniConf := mkdir(c.opts.Dir, "cni", "net.d")
	c.sock = filepath.Join(dir, "containerd.sock")
	cni := fmt.Sprintf(`{
  "cniVersion": "0.4.0",
  "name": "tsrelay-test",
  "plugins": [{
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": true,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "ranges": [[{"subnet": %q}]],
      "routes": [{"dst": "0.0.0.0/0"}],
      "dataDir": %q
    }
  }]
}
`, podSubnet, mkdir(c.opts.Dir, "cni", "ipam"))
	if err := os.WriteFile(filepath.Join(cniConf, "10-tsrelay-test.conflist"), []byte(cni), 0o644); err != nil {
		return err
	}
	// What this host needs (DESIGN.md, "A real kubelet on these
	// machines"): root here lacks CAP_SYS_RESOURCE, so runc must not lower
	// a process's OOM score (restrict_oom_score_adj); there is no AppArmor;
	// and the pods' network namespaces are mounted under the state
	// directory rather than the machine's /run.
	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`, mkdir(dir, "root"), mkdir(dir, "state"), c.sock, mkdir(dir, "opt"), pauseRef,
		filepath.Join(c.opts.Assets, "cni"), cniConf)
	configFile := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(configFile, []byte(config), 0o644); err != nil {
		return err
	}
	c.opts.Log.Info("starting containerd")
	p, err := c.start(ctx, netnsPath, "containerd", "--config="+configFile)
	if err != nil {
		return err
	}
	// Its shims outlive it by design: put it in a cgroup of its own, before
	// it starts any, so that Close can find and stop them.
	if err := joinCgroup(c.opts.CgroupRoot+"/runtime", p.Pid()); err != nil {
		return err
	}
	return c.wait(ctx, "containerd to answer", p, func() (bool, error) {
		out, err := exec.CommandContext(ctx, filepath.Join(c.opts.Assets, "ctr"), "--address", c.sock, "version").CombinedOutput()
		return err == nil && bytes.Contains(out, []byte("Server:")), nil
	})
}

// importImage imports img into containerd's k8s.io namespace, where the
// kubelet's images live.
func (c *Cluster) importImage(ctx context.Context, img Image) error {
	tarFile := filepath.Join(mkdir(c.opts.Dir, "images"), strings.NewReplacer("/", "_", ":", "_").Replace(img.Ref)+".tar")
	f, err := os.Create(tarFile)
	if err != nil {
		return err
	}
	if err := WriteDockerArchive(f, img); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, filepath.Join(c.opts.Assets, "ctr"), "--address", c.sock, "-n", "k8s.io", "images", "import", tarFile).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import %s: %w\n%s", img.Ref, err, out)
	}
	c.opts.Log.Info("imported image", "ref", img.Ref)
	return nil
}

// startNode starts kubelet, kube-proxy, kube-scheduler and
// kube-controller-manager.
func (c *Cluster) startNode(ctx context.Context, netnsPath, kubeletClientCA string) error {
	dir := mkdir(c.opts.Dir, "kubelet")
	// This host: cgroup v1 (failCgroupV1: false), so the cgroupfs driver;
	// swap may be on. oomScoreAdj 0: root here cannot lower it. The
	// API server's client certificate (for logs and exec) is the only way
	// in, and anything it asks is allowed.
	kubeletConfig := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%[1]s
imageServiceEndpoint: unix://%[1]s
cgroupDriver: cgroupfs
cgroupRoot: %[2]s
failSwapOn: false
failCgroupV1: false
oomScoreAdj: 0
address: %[3]s
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: %[4]s
authorization:
  mode: AlwaysAllow
podLogsDir: %[5]s
resolvConf: ""
evictionHard:
  memory.available: 50Mi
  nodefs.available: "1%%"
  imagefs.available: "1%%"
  nodefs.inodesFree: "1%%"
serializeImagePulls: false
shutdownGracePeriod: 0s
`, c.sock, c.opts.CgroupRoot, NodeIP, kubeletClientCA, mkdir(c.opts.Dir, "pod-logs"))
	kubeletFile := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(kubeletFile, []byte(kubeletConfig), 0o644); err != nil {
		return err
	}
	// conntrack zeros: leave the kernel's conntrack settings alone (some
	// are not per namespace).
	proxyConfig := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: %s
hostnameOverride: %s
clusterCIDR: %s
oomScoreAdj: 0
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
`, c.Kubeconfig, NodeName, clusterCIDR)
	proxyFile := filepath.Join(mkdir(c.opts.Dir, "kube-proxy"), "config.yaml")
	if err := os.WriteFile(proxyFile, []byte(proxyConfig), 0o644); err != nil {
		return err
	}
	for _, p := range []struct {
		name string
		args []string
	}{
		{"kubelet", []string{
			"--config=" + kubeletFile,
			"--kubeconfig=" + c.Kubeconfig,
			"--root-dir=" + mkdir(dir, "root"),
			"--hostname-override=" + NodeName,
			"--node-ip=" + NodeIP.String(),
		}},
		{"kube-proxy", []string{"--config=" + proxyFile}},
		{"kube-scheduler", []string{
			"--kubeconfig=" + c.Kubeconfig,
			"--authentication-kubeconfig=" + c.Kubeconfig,
			"--authorization-kubeconfig=" + c.Kubeconfig,
			"--leader-elect=false",
			"--bind-address=127.0.0.1",
		}},
		// The serviceaccount-token and root-ca-cert-publisher controllers
		// give pods their kube-api-access volume.
		{"kube-controller-manager", []string{
			"--kubeconfig=" + c.Kubeconfig,
			"--authentication-kubeconfig=" + c.Kubeconfig,
			"--authorization-kubeconfig=" + c.Kubeconfig,
			"--leader-elect=false",
			"--bind-address=127.0.0.1",
			"--service-account-private-key-file=" + c.API.ServiceAccountKeyFile,
			"--root-ca-file=" + c.API.CAFile,
			"--cluster-cidr=" + clusterCIDR,
		}},
	} {
		if _, err := c.start(ctx, netnsPath, p.name, p.args...); err != nil {
			return err
		}
	}
	return nil
}

// waitNodeReady waits for the node to be Ready and for kube-public to have
// what a pod there needs: its default ServiceAccount and the API server's
// CA (kube-root-ca.crt).
func (c *Cluster) waitNodeReady(ctx context.Context) error {
	var last string
	err := tailnettest.WaitFor(ctx, 200*time.Millisecond, func() (bool, error) {
		for _, p := range c.procs {
			select {
			case <-p.Done():
				return false, fmt.Errorf("%s exited: %w\n%s", p.Name(), p.Wait(ctx), p.LogTail(30))
			default:
			}
		}
		node, err := c.Client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		ready := false
		for _, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				last = fmt.Sprintf("node Ready=%s: %s", cond.Status, cond.Message)
				ready = cond.Status == corev1.ConditionTrue
			}
		}
		if !ready {
			return false, nil
		}
		if _, err := c.Client.CoreV1().ServiceAccounts(metav1.NamespacePublic).Get(ctx, "default", metav1.GetOptions{}); err != nil {
			last = "kube-public: " + err.Error()
			return false, nil
		}
		if _, err := c.Client.CoreV1().ConfigMaps(metav1.NamespacePublic).Get(ctx, "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
			last = "kube-public: " + err.Error()
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("wait for node %s to be Ready (last: %s): %w\nkubelet:\n%s", NodeName, last, err, c.LogTail("kubelet", 30))
	}
	return nil
}

// start starts one of the cluster's programs in the node's namespace,
// logging to Dir/<name>.log.
func (c *Cluster) start(ctx context.Context, netnsPath, name string, args ...string) (*tailnettest.Process, error) {
	p, err := tailnettest.StartProcess(ctx, tailnettest.ProcessConfig{
		Name:      name,
		Path:      filepath.Join(c.opts.Assets, name),
		Args:      args,
		LogFile:   filepath.Join(c.opts.Dir, name+".log"),
		NetnsPath: netnsPath,
	})
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, p)
	return p, nil
}

// wait waits for cond while p runs.
func (c *Cluster) wait(ctx context.Context, what string, p *tailnettest.Process, cond func() (bool, error)) error {
	err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		select {
		case <-p.Done():
			return false, fmt.Errorf("%s exited: %w", p.Name(), p.Wait(ctx))
		default:
		}
		return cond()
	})
	if err != nil {
		return fmt.Errorf("wait for %s: %w\n%s", what, err, p.LogTail(30))
	}
	return nil
}

// LogTail returns the last n lines of the log of one of the cluster's
// programs (kubelet, containerd, kube-proxy, kube-apiserver, ...).
func (c *Cluster) LogTail(name string, n int) string {
	if name == "kube-apiserver" && c.API != nil {
		return c.API.LogTail(n)
	}
	for _, p := range c.procs {
		if p.Name() == name {
			return p.LogTail(n)
		}
	}
	return "(no " + name + ")"
}

// Close stops the cluster: the load-balancer controller, the node's
// programs, the pods' processes and containerd's shims, then the control
// plane, and unmounts what the kubelet and containerd mounted under Dir.
func (c *Cluster) Close() error {
	var errs []error
	c.closeOnce.Do(func() {
		if c.cancel != nil {
			c.cancel()
			<-c.lbDone
		}
		// Exit statuses after SIGTERM are not the cluster's failures;
		// a program that had to be killed is.
		for i := len(c.procs) - 1; i >= 0; i-- {
			if err := c.procs[i].Close(); err != nil && strings.Contains(err.Error(), "killed after SIGTERM") {
				errs = append(errs, err)
			}
		}
		if c.opts.CgroupRoot != "" {
			errs = append(errs, killCgroup(c.opts.CgroupRoot+"/runtime"), killCgroup(c.opts.CgroupRoot+"/kubepods"))
		}
		if c.API != nil {
			if err := c.API.Close(); err != nil && strings.Contains(err.Error(), "killed after SIGTERM") {
				errs = append(errs, err)
			}
		}
		errs = append(errs, unmountUnder(c.opts.Dir))
	})
	return errors.Join(errs...)
}

// mkdir makes the directory elem under dir (with parents) and returns it.
// Errors surface when the directory is used.
func mkdir(dir string, elem ...string) string {
	d := filepath.Join(append([]string{dir}, elem...)...)
	os.MkdirAll(d, 0o755)
	return d
}

// randomName returns prefix and 8 random hex digits.
func randomName(prefix string) string {
	b := make([]byte, 4)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}
