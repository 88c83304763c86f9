package bench

import (
	"github.com/tsrelay/tsrelay/internal/cmdline"

	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// isolatedEnv marks the copy of a program that RunIsolated started.
const isolatedEnv = "TSRELAY_BENCH_ISOLATED"

// Isolated reports whether this process is the copy of the program that
// RunIsolated started in its own network and mount namespaces. Run needs it.
func Isolated() bool { return os.Getenv(isolatedEnv) == "1" }

// CheckHost says what this machine lacks for the benchmark, or nil: root
// (for namespaces and TUN devices), /dev/net/tun, and the programs
// scripts/net-tools installs.
func CheckHost() error {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root (network namespaces and TUN devices)")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		missing = append(missing, "/dev/net/tun")
	}
	for _, p := range []string{"ip", "iptables", "ip6tables", "iperf3", "ping"} {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p+" (run scripts/net-tools)")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the benchmark needs %s", strings.Join(missing, ", "))
	}
	return nil
}

// RunIsolated runs this program again with args, in new network and mount
// namespaces, and waits for it. Everything the copy creates (namespaces,
// links, addresses, NAT rules, processes) lives in those namespaces, so it
// is gone when the copy exits, whatever way it exits. Cancelling ctx sends
// it SIGTERM; it also gets SIGTERM if this process dies.
func RunIsolated(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if err := CheckHost(); err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Env = append(os.Environ(), isolatedEnv+"=1")
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWNS,
		Pdeathsig:  syscall.SIGTERM,
	}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	return cmd.Run()
}

// The lab's address plan. The namespace the bench runs in is the
// "internet": a bridge, world, that every host's eth0 is plugged into.
// Relays run in a pod namespace behind a node namespace, as in a cluster:
// the node forwards the relay's UDP port to the pod (a load balancer's
// DNAT) and masquerades the pod's traffic (SNAT). The internet has no route
// to pod addresses, so peers can reach a relay only at its load-balancer
// address: the static endpoint it is given.
//
// The world also carries IPv6 (fd88::/64), for the IPv6 row only: its
// hosts get an IPv6 address beside their IPv4 one, and its node forwards
// the relay's port over IPv6 alone (see pod).
const (
	worldBridge  = "world"
	worldPrefix  = 16 // hosts are 10.88.x.y/16
	world6Prefix = 64 // and, with IPv6, fd88::n/64
)

var (
	worldGateway  = netip.MustParseAddr("10.88.0.1") // the bench process: control, DERP, STUN
	world6Gateway = netip.MustParseAddr("fd88::1")   // the bench process's IPv6 address; it serves nothing there
)

// lab creates network namespaces for hosts and pods on the world bridge.
type lab struct {
	mu    sync.Mutex
	hosts int // hosts created so far, for addresses
	pods  int
	ipv6  bool // the world bridge has its IPv6 address
}

// newLab makes this process's namespaces the lab's internet. It must run
// in the copy RunIsolated started: it changes mount propagation and the
// network namespace it is in.
func newLab(ctx context.Context) (*lab, error) {
	if !Isolated() {
		return nil, errors.New("the bench must run in its own namespaces (bench.RunIsolated)")
	}
	// `ip netns add` bind-mounts namespaces under /run/netns: keep those
	// mounts, and the names, private to this mount namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return nil, fmt.Errorf("make mounts private: %w", err)
	}
	if err := os.MkdirAll("/run/netns", 0o755); err != nil {
		return nil, err
	}
	if err := unix.Mount("tsrelay-bench", "/run/netns", "tmpfs", 0, "mode=755"); err != nil {
		return nil, fmt.Errorf("mount /run/netns: %w", err)
	}
	err := cmdline.Run(ctx,
		"ip link set lo up",
		"ip link add "+worldBridge+" type bridge",
		fmt.Sprintf("ip addr add %v/%d dev %s", worldGateway, worldPrefix, worldBridge),
		"ip link set "+worldBridge+" up",
	)
	if err != nil {
		return nil, err
	}
	return &lab{}, nil
}

// host creates the network namespace tsb-name plugged into the world bridge
// and returns its address there, and with ipv6 its IPv6 address too. Its
// default routes point at the bench process's namespace, which forwards
// nothing.
func (l *lab) host(ctx context.Context, name string, ipv6 bool) (ns string, addr, addr6 netip.Addr, err error) {
	l.mu.Lock()
	l.hosts++
	n := l.hosts
	// The world gets IPv6 with the first host that needs it, so that the
	// IPv4 rows run in the same world as before there was an IPv6 row.
	// nodad: the address is usable at once, not after duplicate address
	// detection.
	if ipv6 && !l.ipv6 {
		if err := cmdline.Run(ctx, fmt.Sprintf("ip addr add %v/%d dev %s nodad", world6Gateway, world6Prefix, worldBridge)); err != nil {
			l.mu.Unlock()
			return "", netip.Addr{}, netip.Addr{}, err
		}
		l.ipv6 = true
	}
	l.mu.Unlock()
	ns = "tsb-" + name
	addr = netip.AddrFrom4([4]byte{10, 88, byte(n / 250), byte(n%250 + 2)}) // .0.1 is the gateway
	veth := "w" + strconv.Itoa(n)
	lines := cmdline.JoinBridge(ns, veth, worldBridge, addr, worldPrefix, worldGateway)
	if ipv6 {
		a16 := world6Gateway.As16()
		a16[14], a16[15] = byte((n+1)>>8), byte(n+1) // ::1 is the gateway
		addr6 = netip.AddrFrom16(a16)
		lines = append(lines,
			fmt.Sprintf("ip -n %s addr add %v/%d dev eth0 nodad", ns, addr6, world6Prefix),
			fmt.Sprintf("ip -n %s -6 route add default via %v", ns, world6Gateway))
	}
	err = cmdline.Run(ctx, lines...)
	return ns, addr, addr6, err
}

// pod is a relay's network: namespace Netns behind a node that forwards
// LB (the node's world address, UDP port) to it.
type pod struct {
	Netns string
	Addr  netip.Addr // the pod's own IPv4 address, behind the node
	LB    netip.AddrPort
	MTU   int
}

// pod creates a node host, name-node, and behind it a pod namespace, name,
// on a link of the given MTU; the node forwards UDP port to the pod. With
// ipv6 the pod network is dual-stack but the node forwards the port over
// IPv6 only, and LB is its IPv6 address: peers can reach the relay over
// IPv6 alone, while the relay still reaches control, DERP and STUN over
// IPv4.
func (l *lab) pod(ctx context.Context, name string, port, mtu int, ipv6 bool) (pod, error) {
	node, nodeAddr, nodeAddr6, err := l.host(ctx, name+"-node", ipv6)
	if err != nil {
		return pod{}, err
	}
	l.mu.Lock()
	l.pods++
	k := l.pods
	l.mu.Unlock()
	ns := "tsb-" + name
	gw := netip.AddrFrom4([4]byte{10, 89, byte(k), 1})
	addr := gw.Next()
	subnet := netip.PrefixFrom(gw, 24).Masked()
	m := strconv.Itoa(mtu)
	lines := []string{
		"ip netns add " + ns,
		"ip -n " + node + " link add pod0 type veth peer name eth0 netns " + ns,
		"ip -n " + node + " link set pod0 mtu " + m + " up",
		fmt.Sprintf("ip -n %s addr add %v/24 dev pod0", node, gw),
		"ip -n " + ns + " link set lo up",
		"ip -n " + ns + " link set eth0 mtu " + m + " up",
		fmt.Sprintf("ip -n %s addr add %v/24 dev eth0", ns, addr),
		fmt.Sprintf("ip -n %s route add default via %v", ns, gw),
		"ip netns exec " + node + " sysctl -qw net.ipv4.ip_forward=1",
		fmt.Sprintf("ip netns exec %s iptables -t nat -A POSTROUTING -s %v -o eth0 -j MASQUERADE", node, subnet),
	}
	lb := netip.AddrPortFrom(nodeAddr, uint16(port))
	if !ipv6 {
		lines = append(lines, fmt.Sprintf("ip netns exec %s iptables -t nat -A PREROUTING -i eth0 -p udp --dport %d -j DNAT --to-destination %v:%d", node, port, addr, port))
	} else {
		gw6 := netip.AddrFrom16([16]byte{0xfd, 0x89, 0, byte(k), 15: 1})
		addr6 := gw6.Next()
		subnet6 := netip.PrefixFrom(gw6, 64).Masked()
		lines = append(lines,
			fmt.Sprintf("ip -n %s addr add %v/64 dev pod0 nodad", node, gw6),
			fmt.Sprintf("ip -n %s addr add %v/64 dev eth0 nodad", ns, addr6),
			fmt.Sprintf("ip -n %s -6 route add default via %v", ns, gw6),
			"ip netns exec "+node+" sysctl -qw net.ipv6.conf.all.forwarding=1",
			fmt.Sprintf("ip netns exec %s ip6tables -t nat -A PREROUTING -i eth0 -p udp --dport %d -j DNAT --to-destination [%v]:%d", node, port, addr6, port),
			fmt.Sprintf("ip netns exec %s ip6tables -t nat -A POSTROUTING -s %v -o eth0 -j MASQUERADE", node, subnet6),
		)
		lb = netip.AddrPortFrom(nodeAddr6, uint16(port))
	}
	err = cmdline.Run(ctx, lines...)
	return pod{Netns: ns, Addr: addr, LB: lb, MTU: mtu}, err
}

// remove deletes network namespaces; their links go with them. Processes
// still in one keep it alive until they exit.
func remove(namespaces ...string) {
	for _, ns := range namespaces {
		exec.Command("ip", "netns", "del", ns).Run()
	}
}
