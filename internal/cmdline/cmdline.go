// Package cmdline runs the short command lines (ip, iptables, sysctl) with
// which the bench's lab and the real-cluster harness build their networks,
// and writes the ones both need.
package cmdline

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
)

// Run runs each command line in turn, split on white space (no quoting),
// and stops at the first that fails, with its output in the error.
func Run(ctx context.Context, lines ...string) error {
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		out, err := exec.CommandContext(ctx, f[0], f[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %w: %s", l, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// JoinBridge returns the command lines that make network namespace ns a
// host on bridge: a veth pair (hostVeth on the bridge, eth0 in ns), loopback
// up, addr/prefix on eth0 and a default route via gateway.
func JoinBridge(ns, hostVeth, bridge string, addr netip.Addr, prefix int, gateway netip.Addr) []string {
	return []string{
		"ip netns add " + ns,
		"ip link add " + hostVeth + " type veth peer name eth0 netns " + ns,
		"ip link set " + hostVeth + " master " + bridge + " up",
		"ip -n " + ns + " link set lo up",
		fmt.Sprintf("ip -n %s addr add %v/%d dev eth0", ns, addr, prefix),
		"ip -n " + ns + " link set eth0 up",
		fmt.Sprintf("ip -n %s route add default via %v", ns, gateway),
	}
}
