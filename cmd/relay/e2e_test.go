package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/net/stun"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// sizeBudget is the most the stripped relay binary may weigh. Being a
// fraction of the binaries in the stock tailscale/tailscale image is part
// of the point; bench/results/reference.md has both sizes as last measured.
const sizeBudget = 30_000_000

// forwardTarget is where the test's port forward delivers to the relay.
// Linux delivers all of 127.0.0.0/8 to the loopback interface, so the
// relay's wildcard socket receives on it, but it is not an interface address
// and so escapes sinkLocalAddrs.
const forwardTarget = "127.0.0.3"

// sinkLocalAddrs binds port on every address of this machine, with
// SO_REUSEPORT as the relay's own sockets have. The kernel delivers a
// datagram to the socket bound to its exact destination before a wildcard
// one, so these sinks swallow whatever is sent to the relay's port on the
// addresses it discovers by itself (its interface addresses, and 127.0.0.1 as
// the loopback STUN server sees it). The only way into the relay is then the
// static endpoint, so a pong through it proves that the endpoint was
// advertised and works.
func sinkLocalAddrs(t *testing.T, port int) {
	t.Helper()
	sinkInterfaceAddrs(t, port, func(netip.Addr) bool { return true })
}

// sinkInterfaceAddrs is sinkLocalAddrs for the interface addresses that
// keep reports true.
func sinkInterfaceAddrs(t *testing.T, port int, keep func(netip.Addr) bool) {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || ipn.IP.IsLinkLocalUnicast() {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipn.IP)
		if !ok || !keep(ip.Unmap()) {
			continue
		}
		sinkUDP(t, netip.AddrPortFrom(ip.Unmap(), uint16(port)), netip.AddrPort{})
	}
}

// reusePort sets SO_REUSEPORT, so that a sink can share the relay's port.
func reusePort(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	})
	return errors.Join(err, serr)
}

// sinkUDP binds a socket on local that reads nothing, and returns a function
// that closes it (early; t.Cleanup closes it too). With from valid the
// socket is connected to from and swallows only from's datagrams to local:
// the kernel prefers a connected socket to a merely bound one, and a bound
// one to the relay's wildcard sockets.
func sinkUDP(t *testing.T, local, from netip.AddrPort) (closeSink func()) {
	t.Helper()
	var c io.Closer
	var err error
	if from.IsValid() {
		d := net.Dialer{LocalAddr: net.UDPAddrFromAddrPort(local), Control: reusePort}
		c, err = d.DialContext(t.Context(), "udp", from.String())
	} else {
		lc := net.ListenConfig{Control: reusePort}
		c, err = lc.ListenPacket(t.Context(), "udp", local.String())
	}
	if err != nil {
		t.Fatalf("bind a sink on %s (from %s): %v", local, from, err)
	}
	var once sync.Once
	closeSink = func() { once.Do(func() { c.Close() }) }
	t.Cleanup(closeSink)
	return closeSink
}

// forwardedRelayPort picks the relay's UDP port and makes a port forward
// from listen (e.g. "127.0.0.1:0") the only way to reach it: the forward
// delivers to forwardTarget at that port, and sinkLocalAddrs swallows the
// addresses the relay would discover by itself. The forward stands for a
// home router or a load balancer; its address is the endpoint to advertise.
func forwardedRelayPort(t *testing.T, listen string) (relayPort int, endpoint netip.AddrPort) {
	t.Helper()
	relayPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	sinkLocalAddrs(t, relayPort)
	fwd, err := tailnettest.StartPortForward(listen, netip.AddrPortFrom(netip.MustParseAddr(forwardTarget), uint16(relayPort)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fwd.Close() })
	return relayPort, fwd.Addr
}

// buildOnce builds the relay and the laptops' tailscaled and tailscale once
// per test binary run, into a directory that outlives the run so that go
// build can skip an up-to-date link next time.
var buildOnce = sync.OnceValues(func() (tailnettest.Binaries, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir, err := tailnettest.CheckoutBinDir(ctx, "tsrelay-e2e-bin")
	if err != nil {
		return tailnettest.Binaries{}, err
	}
	return tailnettest.Build(ctx, dir)
})

func binaries(t *testing.T) tailnettest.Binaries {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs tailscaled and the relay; skipped in -short mode")
	}
	bins, err := buildOnce()
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	return bins
}

// startRelay runs the real relay binary configured only through env, as a
// pod would, and stops it at the end of the test.
func startRelay(t *testing.T, bins tailnettest.Binaries, name string, env ...string) *tailnettest.Relay {
	t.Helper()
	r, err := tailnettest.StartRelay(t.Context(), bins, name, filepath.Join(t.TempDir(), name+".log"), env...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s log:\n%s", name, r.LogTail(80))
		}
		r.Close()
	})
	return r
}

// waitReady waits for the relay's /readyz to answer 200 and returns the
// answers it gave before, in order.
func waitReady(t *testing.T, r *tailnettest.Relay) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var seen []string
	err := r.WaitReady(ctx, func(code int, body string) {
		if code != http.StatusOK {
			seen = append(seen, fmt.Sprintf("%d %s", code, strings.TrimSpace(body)))
		}
	})
	if err != nil {
		t.Fatalf("relay never became ready (answers seen: %q): %v", seen, err)
	}
	return seen
}

// waitUnready polls /readyz until its answer contains want and returns
// that answer. It fails the test if the relay becomes ready or exits
// meanwhile: the relay must stay up and explain itself.
func waitUnready(t *testing.T, r *tailnettest.Relay, want string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var body string
	err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		select {
		case <-r.Done():
			return false, fmt.Errorf("relay exited: %v", r.Wait(ctx))
		default:
		}
		code, b, err := r.Get(ctx, "/readyz")
		if err != nil {
			return false, nil // not listening yet
		}
		if code == http.StatusOK {
			return false, fmt.Errorf("relay became ready")
		}
		body = b
		return strings.Contains(body, want), nil
	})
	if err != nil {
		t.Fatalf("/readyz never said %q (last answer %q): %v", want, body, err)
	}
	return body
}

// startLaptops brings up laptops a and b, which cannot talk directly, and
// returns a and b's tailnet IP once a sees b.
func startLaptops(t *testing.T, bins tailnettest.Binaries, control *tailnettest.Control) (*tailnettest.Laptop, netip.Addr) {
	t.Helper()
	a := tailnettest.StartLaptopForTest(t, bins, "a")
	b := tailnettest.StartLaptopForTest(t, bins, "b")
	tailnettest.UpForTest(t, control, a)
	ipB := tailnettest.UpForTest(t, control, b)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := a.WaitForPeer(ctx, ipB); err != nil {
		t.Fatal(err)
	}
	return a, ipB
}

// pingVia runs `tailscale ping` from a to ip, as a user would, and fails the
// test unless a pong came via wantVia (e.g. "via peer-relay(addr:port:vni:").
func pingVia(t *testing.T, ctx context.Context, a *tailnettest.Laptop, ip netip.Addr, wantVia string) {
	t.Helper()
	out, err := a.CLI(ctx, "ping", "--c=10", "--until-direct=false", ip.String())
	if err != nil {
		t.Fatalf("tailscale ping: %v\n%s", err, out)
	}
	t.Logf("tailscale ping from a to %s:\n%s", ip, out)
	if !strings.Contains(string(out), wantVia) {
		t.Fatalf("tailscale ping output does not contain %q:\n%s", wantVia, out)
	}
}

// relayMetrics fetches and parses the relay's /metrics.
func relayMetrics(t *testing.T, r *tailnettest.Relay) map[string]*dto.MetricFamily {
	t.Helper()
	m, err := r.Metrics(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// peerByIP returns the peer in st with the tailnet IP ip.
func peerByIP(st *ipnstate.Status, ip netip.Addr) (*ipnstate.PeerStatus, bool) {
	for _, p := range st.Peer {
		if slices.Contains(p.TailscaleIPs, ip) {
			return p, true
		}
	}
	return nil, false
}

// TestRelayEndToEnd runs the real relay binary and two real tailscaled
// "laptops" that cannot reach each other directly, on a loopback tailnet,
// and proves that their traffic moves from DERP onto the relay, and that
// the relay keeps its identity across a restart without an auth key.
func TestRelayEndToEnd(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	// The static endpoint is a port forward to the relay on another port,
	// as behind a home router or a load balancer.
	relayPort, fwdAddr := forwardedRelayPort(t, "127.0.0.1:0")
	endpoint := fwdAddr.String()
	stateDir := t.TempDir()
	env := []string{
		"TS_CONTROL_URL=" + control.URL,
		"TS_STATE_DIR=" + stateDir,
		"TS_HOSTNAME=relay",
		"TS_RELAY_SERVER_PORT=" + strconv.Itoa(relayPort),
		"TS_RELAY_SERVER_STATIC_ENDPOINTS=" + endpoint,
	}
	relay := startRelay(t, bins, "relay", append(env, "TS_AUTHKEY="+control.AuthKey)...)
	// From listening to ready takes a few tens of milliseconds on a warm
	// machine; poll fast enough to see the 503s in between.
	relay.Poll = time.Millisecond
	notReady := waitReady(t, relay)
	relay.Poll = 0
	if len(notReady) == 0 || !strings.HasPrefix(notReady[0], "503 ") {
		t.Errorf("/readyz answers before ready = %q, want at least one 503", notReady)
	}
	t.Logf("/readyz went %q → 200", notReady)

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	before := relayMetrics(t, relay)
	a, ipB := startLaptops(t, bins, control)
	wantVia := "via peer-relay(" + endpoint + ":vni:"
	pingVia(t, ctx, a, ipB, wantVia)

	// /metrics: one valid exposition of tsrelay's series and Tailscale's,
	// whose relay counters rose with the pings.
	after := relayMetrics(t, relay)
	for _, name := range []string{"tailscaled_peer_relay_forwarded_packets_total", "tailscaled_peer_relay_forwarded_bytes_total"} {
		v0, _ := tailnettest.MetricSum(before, name)
		v1, ok := tailnettest.MetricSum(after, name)
		if !ok || v1 <= v0 {
			t.Errorf("%s went from %v to %v (present: %v); want it to rise after relayed pings", name, v0, v1, ok)
		}
		t.Logf("%s: %v → %v", name, v0, v1)
	}
	if v, _ := tailnettest.MetricSum(after, "tsrelay_ready"); v != 1 {
		t.Errorf("tsrelay_ready = %v while /readyz is 200", v)
	}
	if v, _ := tailnettest.MetricSum(after, "tsrelay_relay_sessions"); v < 1 {
		t.Errorf("tsrelay_relay_sessions = %v after relaying, want at least 1", v)
	}
	if v, _ := tailnettest.MetricSum(after, "tsrelay_static_endpoints", "source", "explicit"); v != 1 {
		t.Errorf(`tsrelay_static_endpoints{source="explicit"} = %v, want 1`, v)
	}

	// Junk goes to forwardTarget: 127.0.0.1 is one of the sinks.
	junkDroppedInKernel(t, ctx, relay, netip.AddrPortFrom(netip.MustParseAddr(forwardTarget), uint16(relayPort)), a, ipB, wantVia)

	st, err := a.LocalClient().Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	peerB, ok := peerByIP(st, ipB)
	if !ok || !strings.HasPrefix(peerB.PeerRelay, endpoint+":vni:") {
		t.Errorf("a's status for b: PeerRelay = %q, want %s:vni:N", peerB.PeerRelay, endpoint)
	}

	rs, err := relay.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var packets, bytes uint64
	for _, s := range rs.Relay.SessionTable {
		for _, c := range s.Clients {
			packets += c.PacketsTx
			bytes += c.BytesTx
		}
	}
	if len(rs.Relay.SessionTable) == 0 || packets == 0 || bytes == 0 {
		t.Errorf("relay session table = %+v, want a session with non-zero packet and byte counters", rs.Relay.SessionTable)
	}
	if len(rs.TailscaleIPs) == 0 {
		t.Fatalf("relay reports no tailnet IPs: %+v", rs)
	}
	relayIP := rs.TailscaleIPs[0]
	relayPeer, ok := peerByIP(st, relayIP)
	if !ok {
		t.Fatalf("a does not see the relay (%s) as a peer", relayIP)
	}
	t.Logf("relay session table: %d sessions, %d packets, %d bytes; relay RSS %s", len(rs.Relay.SessionTable), packets, bytes, rss(relay.Pid()))
	nodesBefore := control.Server.NumNodes()
	control.AllowRegisterWithoutKey()

	// Restart: a clean SIGTERM, then the same state and no auth key.
	stopCtx, stopCancel := context.WithTimeout(ctx, 30*time.Second)
	defer stopCancel()
	stopStart := time.Now()
	if err := relay.Stop(stopCtx); err != nil {
		t.Fatalf("relay did not exit cleanly on SIGTERM: %v", err)
	}
	t.Logf("relay stopped in %v", time.Since(stopStart).Round(time.Millisecond))

	relay2 := startRelay(t, bins, "relay-restarted", env...)
	waitReady(t, relay2)
	t.Logf("restarted relay ready %v after the stop; RSS %s", time.Since(stopStart).Round(time.Millisecond), rss(relay2.Pid()))
	rs2, err := relay2.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs2.TailscaleIPs) == 0 || rs2.TailscaleIPs[0] != relayIP || !rs2.Relay.Bound {
		t.Errorf("after restart: IPs %v bound %v, want %s and bound", rs2.TailscaleIPs, rs2.Relay.Bound, relayIP)
	}
	if n := control.Server.NumNodes(); n != nodesBefore {
		t.Errorf("control has %d nodes after the restart, want %d: the relay logged in as a new node", n, nodesBefore)
	}
	if node := control.Server.Node(relayPeer.PublicKey); node == nil {
		t.Errorf("control no longer knows the relay's node key %v", relayPeer.PublicKey.ShortString())
	}
	if log := readFile(t, relay2.LogPath()); strings.Contains(log, control.AuthKey) {
		t.Errorf("relay log contains the auth key")
	}
	// The restarted relay carries traffic again.
	restartedAt := time.Now()
	var out []byte
	if err := tailnettest.WaitFor(ctx, time.Second, func() (bool, error) {
		out, err = a.CLI(ctx, "ping", "--c=5", "--until-direct=false", ipB.String())
		return err == nil && strings.Contains(string(out), wantVia), nil
	}); err != nil {
		t.Errorf("no pong via the restarted relay: %v\n%s", err, out)
	}
	t.Logf("pong via the restarted relay after %v:\n%s", time.Since(restartedAt).Round(time.Millisecond), out)
}

// TestRelayNotReadyWithoutLogin checks that a relay with a bad auth key
// keeps running, explains itself on /readyz and never prints the key.
func TestRelayNotReadyWithoutLogin(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	relayPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	badKey := "tskey-auth-" + key.NewNode().Public().UntypedHexString()[:20]
	relay := startRelay(t, bins, "relay-badkey",
		"TS_CONTROL_URL="+control.URL,
		"TS_STATE_DIR="+t.TempDir(),
		"TS_RELAY_SERVER_PORT="+strconv.Itoa(relayPort),
		"TS_AUTHKEY="+badKey,
	)
	body := waitUnready(t, relay, "invalid")
	if !strings.HasPrefix(body, "NeedsLogin") {
		t.Errorf("/readyz = %q, want it to start with NeedsLogin", body)
	}
	m := relayMetrics(t, relay)
	if v, ok := tailnettest.MetricSum(m, "tsrelay_ready"); !ok || v != 0 {
		t.Errorf("tsrelay_ready = %v (present %v) while /readyz is 503", v, ok)
	}
	if v, _ := tailnettest.MetricSum(m, "tsrelay_backend_state", "state", "NeedsLogin"); v != 1 {
		t.Errorf(`tsrelay_backend_state{state="NeedsLogin"} = %v, want 1`, v)
	}
	if code, _, err := relay.Get(t.Context(), "/healthz"); err != nil || code != http.StatusOK {
		t.Errorf("/healthz = %d, %v; want 200: liveness must not depend on login", code, err)
	}
	select {
	case <-relay.Done():
		t.Fatalf("relay exited on a bad key; it should stay up and unready")
	default:
	}
	for _, out := range []string{body, readFile(t, relay.LogPath())} {
		if strings.Contains(out, badKey) || strings.Contains(out, badKey[len("tskey-auth-"):]) {
			t.Errorf("the auth key appears in the relay's output:\n%s", out)
		}
	}
}

// TestRelayInteractiveLogin checks the path without an auth key: the relay
// logs the login URL, says so on /readyz (without serving the URL), and
// becomes ready once someone completes the login.
func TestRelayInteractiveLogin(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	control.AllowRegisterWithoutKey()
	control.Server.RequireAuth = true // no node has registered yet
	relayPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	relay := startRelay(t, bins, "relay-interactive",
		"TS_CONTROL_URL="+control.URL,
		"TS_STATE_DIR="+t.TempDir(),
		"TS_RELAY_SERVER_PORT="+strconv.Itoa(relayPort),
	)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var loginURL, body string
	err = tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		_, body, _ = relay.Get(ctx, "/readyz")
		for line := range strings.SplitSeq(readFile(t, relay.LogPath()), "\n") {
			if _, after, ok := strings.Cut(line, "login needed"); ok {
				if _, u, ok := strings.Cut(after, " url="); ok {
					loginURL = strings.Fields(u)[0]
				}
			}
		}
		return loginURL != "" && strings.HasPrefix(body, "NeedsLogin: login URL printed in the log"), nil
	})
	if err != nil {
		t.Fatalf("no login URL in the log, or /readyz = %q: %v", body, err)
	}
	if strings.Contains(body, loginURL) {
		t.Errorf("/readyz serves the login URL; whoever opens it first owns the node")
	}
	if !control.Server.CompleteAuth(loginURL) {
		t.Fatalf("control does not know the logged URL %q", loginURL)
	}
	waitReady(t, relay)
}

// TestRelayNotReadyWhenPortTaken checks that a relay whose UDP port is held
// by another socket logs in but stays unready: advertised but not bound is
// the failure users cannot see from outside.
func TestRelayNotReadyWhenPortTaken(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	squatter, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close()
	port := squatter.LocalAddr().(*net.UDPAddr).Port
	relay := startRelay(t, bins, "relay-porttaken",
		"TS_CONTROL_URL="+control.URL,
		"TS_STATE_DIR="+t.TempDir(),
		"TS_RELAY_SERVER_PORT="+strconv.Itoa(port),
		"TS_AUTHKEY="+control.AuthKey,
	)
	waitUnready(t, relay, fmt.Sprintf("relay not bound on UDP port %d", port))
}

// TestNoTestCodeInBinary keeps the test control server, fakes, the testing
// package and client-go's typed clients out of the production binary.
func TestNoTestCodeInBinary(t *testing.T) {
	out, err := exec.CommandContext(t.Context(), "go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for pkg := range strings.FieldsSeq(string(out)) {
		if pkg == "testing" || strings.Contains(pkg, "/tstest") || strings.HasSuffix(pkg, "/fake") ||
			strings.HasSuffix(pkg, "/tailnettest") || strings.HasSuffix(pkg, "/kubetest") ||
			strings.HasSuffix(pkg, "/testcontrol") {
			t.Errorf("cmd/relay links test-only package %s", pkg)
		}
		// The typed clients link every type in k8s.io/api, far more than
		// the dynamic client, which breaks the size budget.
		// lbaddr and kubeevents are written against the dynamic client, and
		// client-go's record package links the typed clients too.
		if strings.HasPrefix(pkg, "k8s.io/api/") || strings.HasPrefix(pkg, "k8s.io/client-go/kubernetes") ||
			pkg == "k8s.io/client-go/tools/record" {
			t.Errorf("cmd/relay links %s; use the dynamic client (the typed clients link all of k8s.io/api, over the size budget)", pkg)
		}
	}
}

func TestBinarySize(t *testing.T) {
	bins := binaries(t)
	fi, err := os.Stat(bins.Relay)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stripped relay binary: %.1f MB (budget %.1f MB)", float64(fi.Size())/1e6, float64(sizeBudget)/1e6)
	if fi.Size() > sizeBudget {
		t.Errorf("stripped relay binary is %d bytes, over the %d-byte budget; go list -deps ./cmd/relay shows what it links (the typed Kubernetes clients must stay out)", fi.Size(), sizeBudget)
	}
}

// rss returns a process's resident set size as the kernel reports it, for
// the test log; it is a measurement, not an assertion.
func rss(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "unknown"
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// junkDroppedInKernel sends junk at the relay's port (to) while a pair relays
// through it: random bytes, Geneve headers Tailscale would not send, STUN
// requests. The kernel must drop every one at the relay's socket filter
// (tsrelay_relay_socket_drops_total rises by at least as many; without the
// filter the relay server reads them and the count stays put), and the
// pair must still be relayed.
func junkDroppedInKernel(t *testing.T, ctx context.Context, relay *tailnettest.Relay, to netip.AddrPort, a *tailnettest.Laptop, ipB netip.Addr, wantVia string) {
	t.Helper()
	if log := readFile(t, relay.LogPath()); !strings.Contains(log, `msg="relay sockets filtered" port=`+strconv.Itoa(int(to.Port()))) {
		t.Errorf("the relay did not log its sockets filtered:\n%s", log)
	}
	drops := func() float64 {
		v, ok := tailnettest.MetricSum(relayMetrics(t, relay), "tsrelay_relay_socket_drops_total")
		if !ok {
			t.Fatal("/metrics lacks tsrelay_relay_socket_drops_total")
		}
		return v
	}
	before := drops()
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	const sent = 3000
	for i := range sent {
		b := make([]byte, 1+rng.IntN(1400))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		switch i % 3 {
		case 1: // Geneve, as Tailscale writes it but for a reserved bit
			b = append(b, make([]byte, 48)...)
			b[0], b[1], b[7] = 0, 0x01, 0
			binary.BigEndian.PutUint16(b[2:], 0x7A12)
		case 2:
			b = stun.Request(stun.NewTxID())
		}
		if _, err := c.Write(b); err != nil {
			t.Fatalf("send junk: %v", err)
		}
	}
	var got float64
	waitCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := tailnettest.WaitFor(waitCtx, 50*time.Millisecond, func() (bool, error) {
		got = drops() - before
		return got >= sent, nil
	}); err != nil {
		t.Errorf("tsrelay_relay_socket_drops_total rose by %v after %d junk datagrams, want at least %d: the relay's sockets are not filtered", got, sent, sent)
	} else {
		t.Logf("%d junk datagrams at the relay port: %v dropped in the kernel", sent, got)
	}
	pingVia(t, ctx, a, ipB, wantVia)
}
