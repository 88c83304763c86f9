package tailnettest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn"
)

// pollInterval is how often this package re-checks a condition it waits for.
const pollInterval = 50 * time.Millisecond

// maxSocketPath leaves room for the NUL in sockaddr_un's 108-byte sun_path.
const maxSocketPath = 100

// OffMachineEnv returns the environment that keeps a tailscaled, tsnet node
// or relay on this machine.
func OffMachineEnv() []string {
	return []string{
		// Don't pause the control client because no "real" interface is up.
		"TS_ASSUME_NETWORK_UP_FOR_TEST=1",
		// Everything is on loopback; never talk UPnP/NAT-PMP/PCP to a router.
		"TS_DISABLE_PORTMAPPER=1",
		// Crash rather than reach Tailscale's real control plane by mistake.
		"TS_PANIC_IF_HIT_MAIN_CONTROL=1",
		// No log uploads, nor the fallback dials to Tailscale's public DERP
		// servers (also set as tailscaled's --no-logs-no-support flag).
		"TS_NO_LOGS_NO_SUPPORT=true",
	}
}

// laptopEnv returns the environment of every laptop's tailscaled and CLI.
func laptopEnv() []string {
	// No direct UDP path between peers, so traffic must use DERP or a peer
	// relay: that is what the tests want to observe.
	return append(OffMachineEnv(), "TS_DEBUG_NEVER_DIRECT_UDP=1")
}

// ScrubbedEnviron returns this process's environment without any TS_*
// variable, so that a developer's shell (TS_AUTHKEY, TS_DEBUG_*) cannot leak
// into a tailnet the tests or the bench start.
func ScrubbedEnviron() []string { return scrubbedEnviron() }

// Laptop is a real tailscaled process, by default in userspace-networking
// mode, with its own state directory, LocalAPI socket and WireGuard port,
// plus its CLI.
type Laptop struct {
	// Name is the laptop's label and, after Up, its tailnet hostname.
	Name string
	// Dir holds the laptop's state (Dir/state), log (Dir/tailscaled.log)
	// and usually its socket.
	Dir string
	// Socket is the LocalAPI unix socket.
	Socket string
	// Port is tailscaled's WireGuard UDP port.
	Port int

	opts    LaptopOptions
	bins    Binaries
	proc    *Process
	lc      *local.Client
	sockDir string // a short temporary directory holding Socket, if Dir was too long
}

// LaptopOptions are the ways a laptop can differ from the default: a
// userspace-networking tailscaled on this namespace's loopback that never
// uses direct UDP, so that its traffic to peers takes DERP or a peer relay.
type LaptopOptions struct {
	// AllowDirect lets the laptop use direct UDP paths to its peers.
	AllowDirect bool
	// Netns runs tailscaled in this named network namespace (`ip netns
	// add`) instead of the caller's.
	Netns string
	// KernelTUN gives tailscaled a kernel TUN device (tailscale0) instead of
	// userspace networking; it needs root, /dev/net/tun and, so as not to
	// touch the caller's routes and firewall, Netns. Up then turns off
	// netfilter rules and DNS configuration.
	KernelTUN bool
	// Poll is how often the laptop's start and Up re-check what they wait
	// for; zero means 50 ms. Timing measurements want less.
	Poll time.Duration
	// Env is added to tailscaled's environment (e.g. GOMAXPROCS=16).
	Env []string
}

// env returns the environment of the laptop's tailscaled and CLI.
func (o LaptopOptions) env() []string {
	env := laptopEnv()
	if o.AllowDirect {
		env = OffMachineEnv()
	}
	return append(env, o.Env...)
}

func (o LaptopOptions) poll() time.Duration {
	if o.Poll > 0 {
		return o.Poll
	}
	return pollInterval
}

// StartLaptop starts tailscaled for a laptop called name, keeping its files
// in dir (created if needed), and waits until its LocalAPI socket accepts
// connections. The laptop is logged out; call Up to join a tailnet. ctx
// bounds only the start; Close stops the laptop.
func StartLaptop(ctx context.Context, bins Binaries, dir, name string) (*Laptop, error) {
	return StartLaptopWith(ctx, bins, dir, name, LaptopOptions{})
}

// StartLaptopWith is StartLaptop with options. Started again on the same
// dir, a laptop resumes from its saved state: WaitRunning then waits for it
// to be back on the tailnet.
func StartLaptopWith(ctx context.Context, bins Binaries, dir, name string, opts LaptopOptions) (_ *Laptop, err error) {
	if bins.Tailscaled == "" || bins.Tailscale == "" {
		return nil, fmt.Errorf("start laptop %s: tailscaled or tailscale binary not built", name)
	}
	if opts.KernelTUN && opts.Netns == "" {
		return nil, fmt.Errorf("start laptop %s: a kernel TUN laptop needs its own network namespace", name)
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("start laptop %s: %w", name, err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return nil, fmt.Errorf("start laptop %s: %w", name, err)
	}
	port := 41641 // tailscaled's default; the namespace is the laptop's own
	if opts.Netns == "" {
		if port, err = FreeUDPPort(); err != nil {
			return nil, fmt.Errorf("start laptop %s: %w", name, err)
		}
	}
	l := &Laptop{
		Name:   name,
		Dir:    dir,
		Socket: filepath.Join(dir, "tailscaled.sock"),
		Port:   port,
		opts:   opts,
		bins:   bins,
	}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	if len(l.Socket) > maxSocketPath {
		// Deep test temp directories overflow sun_path; bind(2) would fail.
		l.sockDir, err = os.MkdirTemp("", "tnt")
		if err != nil {
			return nil, fmt.Errorf("start laptop %s: socket directory: %w", name, err)
		}
		l.Socket = filepath.Join(l.sockDir, "s")
	}
	l.lc = &local.Client{Socket: l.Socket, UseSocketOnly: true}

	tun := "--tun=userspace-networking"
	if opts.KernelTUN {
		tun = "--tun=tailscale0"
	}
	l.proc, err = StartProcess(ctx, ProcessConfig{
		Name: "tailscaled[" + name + "]",
		Path: bins.Tailscaled,
		Args: []string{
			"--statedir=" + filepath.Join(dir, "state"),
			"--socket=" + l.Socket,
			"--port=" + strconv.Itoa(port),
			tun,
			"--no-logs-no-support",
		},
		Env:     opts.env(),
		Dir:     dir,
		Netns:   opts.Netns,
		LogFile: filepath.Join(dir, "tailscaled.log"),
	})
	if err != nil {
		return nil, fmt.Errorf("start laptop %s: %w", name, err)
	}

	// Connect rather than run `tailscale status`: its exit code 1 means
	// both "no daemon" and "needs login".
	var d net.Dialer
	err = WaitFor(ctx, opts.poll(), func() (bool, error) {
		select {
		case <-l.proc.Done():
			return false, fmt.Errorf("tailscaled exited: %w", l.proc.Wait(ctx))
		default:
		}
		c, err := d.DialContext(ctx, "unix", l.Socket)
		if err != nil {
			return false, nil
		}
		c.Close()
		return true, nil
	})
	if err != nil {
		return nil, fmt.Errorf("start laptop %s: wait for LocalAPI socket: %w\n%s", name, err, l.LogTail(20))
	}
	return l, nil
}

// Up joins the laptop to the tailnet at controlURL with authKey and
// hostname l.Name, and waits until it is Running with a tailnet IP. The key
// reaches the CLI through a file, so it never appears in a process list or
// an error.
func (l *Laptop) Up(ctx context.Context, controlURL, authKey string) error {
	keyFile := filepath.Join(l.Dir, "authkey")
	if err := os.WriteFile(keyFile, []byte(authKey), 0o600); err != nil {
		return fmt.Errorf("up %s: write auth key file: %w", l.Name, err)
	}
	defer os.Remove(keyFile)

	args := []string{"up",
		"--login-server=" + controlURL,
		"--auth-key=file:" + keyFile,
		"--hostname=" + l.Name,
	}
	if l.opts.KernelTUN {
		// Leave the namespace's firewall and resolv.conf alone.
		args = append(args, "--netfilter-mode=off", "--accept-dns=false")
	}
	out, err := l.command(ctx, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("up %s: tailscale up: %w\n%s", l.Name, err, out)
	}
	return l.WaitRunning(ctx)
}

// WaitRunning waits until the laptop is Running with a tailnet IP: after
// Up, or after a restart from saved state.
func (l *Laptop) WaitRunning(ctx context.Context) error {
	var last string
	err := WaitFor(ctx, l.opts.poll(), func() (bool, error) {
		select {
		case <-l.proc.Done():
			return false, fmt.Errorf("tailscaled exited: %w", l.proc.Wait(ctx))
		default:
		}
		st, err := l.lc.StatusWithoutPeers(ctx)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = fmt.Sprintf("state %s, IPs %v, health %q", st.BackendState, st.TailscaleIPs, st.Health)
		return st.BackendState == ipn.Running.String() && len(st.TailscaleIPs) > 0, nil
	})
	if err != nil {
		return fmt.Errorf("%s: wait for Running (last: %s): %w", l.Name, last, err)
	}
	return nil
}

// command returns `tailscale --socket=l.Socket args...` with the laptop's
// environment. It is killed if ctx ends.
func (l *Laptop) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, l.bins.Tailscale, append([]string{"--socket=" + l.Socket}, args...)...)
	cmd.Dir = l.Dir
	cmd.Env = append(scrubbedEnviron(), l.opts.env()...)
	return cmd
}

// CLI runs `tailscale --socket=l.Socket args...` and returns its combined
// output. On failure the error includes the arguments and the output.
func (l *Laptop) CLI(ctx context.Context, args ...string) ([]byte, error) {
	out, err := l.command(ctx, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s: tailscale %s: %w\n%s", l.Name, strings.Join(args, " "), err, out)
	}
	return out, nil
}

// Pid returns the process ID of the laptop's tailscaled.
func (l *Laptop) Pid() int { return l.proc.Pid() }

// LocalClient returns a LocalAPI client for the laptop's tailscaled.
func (l *Laptop) LocalClient() *local.Client { return l.lc }

// IP returns the laptop's tailnet IPv4 address. It fails before Up.
func (l *Laptop) IP(ctx context.Context) (netip.Addr, error) {
	st, err := l.lc.StatusWithoutPeers(ctx)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("tailnet IP of %s: %w", l.Name, err)
	}
	for _, ip := range st.TailscaleIPs {
		if ip.Is4() {
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("tailnet IP of %s: no IPv4 address (state %s)", l.Name, st.BackendState)
}

// WaitForPeer waits until the laptop's netmap contains a peer with tailnet
// address ip. Pinging a peer before that fails at once with "no matching
// peer".
func (l *Laptop) WaitForPeer(ctx context.Context, ip netip.Addr) error {
	err := WaitFor(ctx, l.opts.poll(), func() (bool, error) {
		st, err := l.lc.Status(ctx)
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
	if err != nil {
		return fmt.Errorf("%s: wait for peer %v: %w", l.Name, ip, err)
	}
	return nil
}

// LogTail returns the last n lines of the laptop's tailscaled log.
func (l *Laptop) LogTail(n int) string {
	return logTail(filepath.Join(l.Dir, "tailscaled.log"), n)
}

// Close stops tailscaled (SIGTERM, then SIGKILL after 10 s) and removes the
// temporary socket directory, if one was needed. Dir is left in place.
func (l *Laptop) Close() error {
	var errs []error
	if l.proc != nil {
		errs = append(errs, l.proc.Close())
	}
	if l.sockDir != "" {
		errs = append(errs, os.RemoveAll(l.sockDir))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close laptop %s: %w", l.Name, err)
	}
	return nil
}
