package bench

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// node is a tailscaled in userspace-networking mode: a laptop, or the stock
// peer relay baseline. Unlike tailnettest.Laptop, whether it may use direct
// UDP is a choice, so that the direct path can be measured too.
type node struct {
	name   string
	dir    string
	socket string
	bins   tailnettest.Binaries
	env    []string
	proc   *tailnettest.Process
	lc     *local.Client
}

// startNode starts tailscaled for name with its files in dir (reused if it
// holds state) and waits for its LocalAPI socket. With neverDirect the node
// never uses direct UDP to a peer, so its traffic takes DERP or a relay.
func startNode(ctx context.Context, bins tailnettest.Binaries, dir, name string, neverDirect bool) (*node, error) {
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return nil, err
	}
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		return nil, err
	}
	n := &node{
		name:   name,
		dir:    dir,
		socket: filepath.Join(dir, "s.sock"),
		bins:   bins,
		env:    tailnettest.OffMachineEnv(),
	}
	if neverDirect {
		n.env = append(n.env, "TS_DEBUG_NEVER_DIRECT_UDP=1")
	}
	n.lc = &local.Client{Socket: n.socket, UseSocketOnly: true}
	n.proc, err = tailnettest.StartProcess(ctx, tailnettest.ProcessConfig{
		Name: "tailscaled[" + name + "]",
		Path: bins.Tailscaled,
		Args: []string{
			"--statedir=" + filepath.Join(dir, "state"),
			"--socket=" + n.socket,
			"--port=" + strconv.Itoa(port),
			"--tun=userspace-networking",
			"--no-logs-no-support",
		},
		Env:     n.env,
		Dir:     dir,
		LogFile: filepath.Join(dir, "tailscaled.log"),
	})
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	err = tailnettest.WaitFor(ctx, 5*time.Millisecond, func() (bool, error) {
		select {
		case <-n.proc.Done():
			return false, fmt.Errorf("tailscaled[%s] exited: %v", name, n.proc.Wait(ctx))
		default:
		}
		c, err := d.DialContext(ctx, "unix", n.socket)
		if err != nil {
			return false, nil
		}
		c.Close()
		return true, nil
	})
	if err != nil {
		n.close()
		return nil, fmt.Errorf("start %s: %w\n%s", name, err, n.proc.LogTail(20))
	}
	return n, nil
}

// cli runs `tailscale --socket=… args…` with the node's environment.
func (n *node) cli(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, n.bins.Tailscale, append([]string{"--socket=" + n.socket}, args...)...)
	cmd.Dir = n.dir
	cmd.Env = append(tailnettest.ScrubbedEnviron(), n.env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: tailscale %s: %w\n%s", n.name, args[0], err, out)
	}
	return nil
}

// up joins the tailnet (the auth key goes through a file, never argv) and
// waits until the node is Running with an IPv4 address, which it returns.
func (n *node) up(ctx context.Context, c *tailnettest.Control) (netip.Addr, error) {
	keyFile := filepath.Join(n.dir, "authkey")
	if err := os.WriteFile(keyFile, []byte(c.AuthKey), 0o600); err != nil {
		return netip.Addr{}, err
	}
	defer os.Remove(keyFile)
	if err := n.cli(ctx, "up", "--login-server="+c.URL, "--auth-key=file:"+keyFile, "--hostname="+n.name); err != nil {
		return netip.Addr{}, err
	}
	return n.waitRunning(ctx)
}

func (n *node) waitRunning(ctx context.Context) (netip.Addr, error) {
	var ip netip.Addr
	err := tailnettest.WaitFor(ctx, 10*time.Millisecond, func() (bool, error) {
		st, err := n.lc.StatusWithoutPeers(ctx)
		if err != nil || st.BackendState != ipn.Running.String() {
			return false, nil
		}
		for _, a := range st.TailscaleIPs {
			if a.Is4() {
				ip = a
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return ip, fmt.Errorf("%s: wait for Running: %w", n.name, err)
	}
	return ip, nil
}

// waitPeer waits until ip is in the node's netmap.
func (n *node) waitPeer(ctx context.Context, ip netip.Addr) error {
	return tailnettest.WaitFor(ctx, 20*time.Millisecond, func() (bool, error) {
		st, err := n.lc.Status(ctx)
		if err != nil {
			return false, nil
		}
		for _, p := range st.Peer {
			if slices.Contains(p.TailscaleIPs, ip) {
				return true, nil
			}
		}
		return false, nil
	})
}

// waitRelayBound polls the node's relay server until its UDP socket is
// bound, every 10 ms.
func (n *node) waitRelayBound(ctx context.Context) error {
	return tailnettest.WaitFor(ctx, 10*time.Millisecond, func() (bool, error) {
		select {
		case <-n.proc.Done():
			return false, fmt.Errorf("%s exited", n.name)
		default:
		}
		st, err := n.lc.DebugPeerRelaySessions(ctx)
		return err == nil && st.UDPPort != nil, nil
	})
}

func (n *node) close() error {
	if n == nil || n.proc == nil {
		return nil
	}
	return n.proc.Close()
}
