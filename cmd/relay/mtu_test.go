package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	authzv1 "k8s.io/api/authorization/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/netnstest"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// Log lines the relay writes when the verdict on the path MTU changes.
const (
	mtuWarnLine = `level=WARN msg="path MTU too small for relayed packets" ipv4Interface=v0 ipv4MTU=1230 needIPv4=1348 needIPv6=1368 tunnelInTunnel="v0 has MTU 1230 = 1280 (Tailscale's MTU) - 50`
	mtuOKLine   = `level=INFO msg="path MTU ok" ipv4Interface=v0 ipv4MTU=1500`
)

// TestRelayPathMTU runs the real relay binary in a network namespace whose
// only way out is a veth at the pod MTU of the user report (1230: Flannel
// VXLAN over tailscale0) or a healthy 1500. At 1230 the relay must warn in
// its log, in an Event on its pod, in /metrics and in /readyz?verbose, and
// stay ready; at 1500 it must say nothing. Then the MTU is flipped while
// the relay runs, and the relay must notice.
func TestRelayPathMTU(t *testing.T) {
	binaries(t) // built here, so that the namespaced runs find it built
	for _, mtu := range []int{1230, 1500} {
		t.Run(fmt.Sprint("mtu", mtu), func(t *testing.T) {
			netnstest.Run(t, func(t *testing.T) { testRelayPathMTU(t, mtu) })
		})
	}
}

func testRelayPathMTU(t *testing.T, mtu int) {
	bins := binaries(t)
	ip := func(args ...string) { netnstest.IP(t, args...) }
	// The pod's eth0: the default route leaves through v0 at mtu. Nothing
	// answers on 10.77.0.2; the tailnet is on loopback.
	ip("link", "add", "v0", "mtu", fmt.Sprint(mtu), "type", "veth", "peer", "name", "v1", "mtu", fmt.Sprint(mtu))
	ip("link", "set", "v0", "up")
	ip("link", "set", "v1", "up")
	ip("addr", "add", "10.77.0.1/24", "dev", "v0")
	ip("route", "add", "default", "via", "10.77.0.2", "dev", "v0")

	const ns, pod = "kube-public", "tsrelay-mtu"
	env := []string{"TS_STATE_DIR=" + t.TempDir()}
	var admin kubernetes.Interface
	if _, err := kubetest.Assets(); err != nil {
		t.Logf("no Kubernetes API server, so no Events to check: %v", err)
	} else {
		var kubeEnv []string
		admin, kubeEnv = kubeForRelay(t, ns)
		env = append(env, kubeEnv...)
		env = append(env, "POD_NAME="+pod, "POD_NAMESPACE="+ns, "POD_UID="+pod+"-uid")
	}
	control := tailnettest.StartControlForTest(t)
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	env = append(env, "TS_CONTROL_URL="+control.URL, "TS_AUTHKEY="+control.AuthKey, fmt.Sprintf("TS_RELAY_SERVER_PORT=%d", port))
	relay := startRelay(t, bins, "relay", env...)
	// A small MTU slows relaying down; it does not stop it.
	waitReady(t, relay)

	bad := mtu < 1348
	st, err := relay.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !st.Ready || st.PathMTU == nil || len(st.PathMTU.Paths) == 0 {
		t.Fatalf("/readyz?verbose = %+v, want ready with the path MTU", st)
	}
	p := st.PathMTU.Paths[0]
	if p.Family != "ipv4" || p.Interface != "v0" || p.Kind != "veth" || p.MTU != mtu || p.TooSmall != bad {
		t.Errorf("/readyz?verbose path = %+v, want ipv4 via v0 (veth) at %d, tooSmall %v", p, mtu, bad)
	}
	if st.PathMTU.OK == bad || (st.PathMTU.TunnelInTunnel != "") != bad || (len(st.Warnings) > 0) != bad {
		t.Errorf("/readyz?verbose: ok %v, tunnelInTunnel %q, warnings %q; want problems %v", st.PathMTU.OK, st.PathMTU.TunnelInTunnel, st.Warnings, bad)
	}
	if bad && !strings.HasPrefix(strings.Join(st.Warnings, ""), "path MTU too small for relayed packets: ipv4 via v0 has MTU 1230, relayed packets need 1348") {
		t.Errorf("/readyz?verbose warnings = %q, want the path MTU with the numbers", st.Warnings)
	}

	m := relayMetrics(t, relay)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tsrelay_path_mtu_bytes", []string{"family", "ipv4", "interface", "v0"}, float64(mtu)},
		{"tsrelay_path_mtu_needed_bytes", []string{"family", "ipv4"}, 1348},
		{"tsrelay_path_mtu_needed_bytes", []string{"family", "ipv6"}, 1368},
		{"tsrelay_path_mtu_too_small", nil, bit(bad)},
		{"tsrelay_path_tunnel_in_tunnel", nil, bit(bad)},
		{"tsrelay_ready", nil, 1},
	} {
		if got, ok := tailnettest.MetricSum(m, c.name, c.labels...); !ok || got != c.want {
			t.Errorf("%s%v = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}

	// The check runs before the node starts, so its log line is written
	// by the time the relay is ready.
	log := readFile(t, relay.LogPath())
	if got := strings.Contains(log, mtuWarnLine); got != bad {
		t.Errorf("relay log has %q: %v, want %v", mtuWarnLine, got, bad)
	}
	if n := strings.Count(log, "path MTU"); float64(n) > bit(bad) {
		t.Errorf("relay log mentions the path MTU %d times, want at most %v", n, bit(bad))
	}
	// Events are posted in the order they are recorded, and the check runs
	// before the relay binds: once RelayBound is there, an MTU Event would
	// be too.
	want := map[string]int32{"StateLoaded": 1, "LoggedIn": 1, "RelayBound": 1}
	if bad {
		want["PathMTUTooSmall"], want["TunnelInTunnel"] = 1, 1
	}
	if admin != nil {
		waitEvents(t, admin, ns, pod, want)
	}

	// Flip the MTU. The relay's network monitor ignores link changes, so
	// an address change comes with it, as a new pod network would bring;
	// the relay must notice well before its 30 s re-check.
	newMTU, wantLine := 1230, mtuWarnLine
	if bad {
		newMTU, wantLine = 1500, mtuOKLine
	}
	ip("link", "set", "v0", "mtu", fmt.Sprint(newMTU))
	ip("link", "set", "v1", "mtu", fmt.Sprint(newMTU))
	changed := time.Now()
	ip("addr", "add", "10.77.0.9/24", "dev", "v0")
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		return strings.Contains(readFile(t, relay.LogPath()), wantLine), nil
	}); err != nil {
		t.Fatalf("relay log never said %q after the MTU went to %d: %v", wantLine, newMTU, err)
	}
	t.Logf("relay noticed the MTU change to %d after %v", newMTU, time.Since(changed).Round(time.Millisecond))
	for line := range strings.Lines(readFile(t, relay.LogPath())) {
		if strings.Contains(line, "path MTU") || strings.Contains(line, "tunnel") {
			t.Logf("relay log: %s", strings.TrimSpace(line))
		}
	}
	if got, _ := tailnettest.MetricSum(relayMetrics(t, relay), "tsrelay_path_mtu_too_small"); got != bit(!bad) {
		t.Errorf("after the MTU went to %d, tsrelay_path_mtu_too_small = %v, want %v", newMTU, got, bit(!bad))
	}
	if admin != nil {
		if bad {
			want["PathMTUOK"] = 1
		} else {
			want["PathMTUTooSmall"], want["TunnelInTunnel"] = 1, 1
		}
		waitEvents(t, admin, ns, pod, want)
	}
	if code, _, err := relay.Get(t.Context(), "/readyz"); err != nil || code != http.StatusOK {
		t.Errorf("after the MTU change /readyz = %d, %v; want 200", code, err)
	}
}

// TestRelayPathMTUIPv6 is TestRelayPathMTU for the IPv6 route: a pod
// whose IPv4 route is fine (1500) but whose IPv6 route carries MTU 1360,
// which fits an IPv4 relayed packet (1348 bytes) and not an IPv6 one (1368:
// the IPv6 header is 20 bytes longer). The relay must warn about IPv6 alone,
// with its numbers, and notice when the IPv6 route is fixed.
func TestRelayPathMTUIPv6(t *testing.T) {
	binaries(t)
	netnstest.Run(t, testRelayPathMTUIPv6)
}

func testRelayPathMTUIPv6(t *testing.T) {
	bins := binaries(t)
	ip := func(args ...string) { netnstest.IP(t, args...) }
	ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
	ip("link", "set", "v0", "up")
	ip("link", "set", "v1", "up")
	ip("addr", "add", "10.77.0.1/24", "dev", "v0")
	ip("addr", "add", "fd77::1/64", "dev", "v0", "nodad")
	ip("route", "add", "default", "via", "10.77.0.2", "dev", "v0")
	ip("-6", "route", "add", "default", "via", "fd77::2", "dev", "v0", "mtu", "1360")

	control := tailnettest.StartControlForTest(t)
	port, err := tailnettest.FreeDualStackUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	relay := startRelay(t, bins, "relay", "TS_STATE_DIR="+t.TempDir(),
		"TS_CONTROL_URL="+control.URL, "TS_AUTHKEY="+control.AuthKey, fmt.Sprintf("TS_RELAY_SERVER_PORT=%d", port))
	waitReady(t, relay)

	st, err := relay.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.PathMTU == nil || len(st.PathMTU.Paths) != 2 {
		t.Fatalf("/readyz?verbose pathMTU = %+v, want an IPv4 and an IPv6 path", st.PathMTU)
	}
	if st.PathMTU.NeedIPv4 != 1348 || st.PathMTU.NeedIPv6 != 1368 || st.PathMTU.OK {
		t.Errorf("/readyz?verbose pathMTU: needIPv4 %d, needIPv6 %d, ok %v; want 1348, 1368, false", st.PathMTU.NeedIPv4, st.PathMTU.NeedIPv6, st.PathMTU.OK)
	}
	for i, want := range []struct {
		family   string
		mtu      int
		tooSmall bool
	}{{"ipv4", 1500, false}, {"ipv6", 1360, true}} {
		p := st.PathMTU.Paths[i]
		if p.Family != want.family || p.Interface != "v0" || p.MTU != want.mtu || p.TooSmall != want.tooSmall {
			t.Errorf("/readyz?verbose path %d = %+v, want %s via v0 at %d, tooSmall %v", i, p, want.family, want.mtu, want.tooSmall)
		}
	}
	t.Logf("/readyz?verbose paths %+v, warnings %q", st.PathMTU.Paths, st.Warnings)
	const wantWarning = "path MTU too small for relayed packets: ipv6 via v0 has MTU 1360, relayed packets need 1368;"
	if len(st.Warnings) != 1 || !strings.HasPrefix(st.Warnings[0], wantWarning) || st.PathMTU.TunnelInTunnel != "" {
		t.Errorf("/readyz?verbose warnings = %q, tunnelInTunnel %q; want one starting %q and no tunnel", st.Warnings, st.PathMTU.TunnelInTunnel, wantWarning)
	}
	m := relayMetrics(t, relay)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tsrelay_path_mtu_bytes", []string{"family", "ipv4", "interface", "v0"}, 1500},
		{"tsrelay_path_mtu_bytes", []string{"family", "ipv6", "interface", "v0"}, 1360},
		{"tsrelay_path_mtu_needed_bytes", []string{"family", "ipv6"}, 1368},
		{"tsrelay_path_mtu_too_small", nil, 1},
		{"tsrelay_path_tunnel_in_tunnel", nil, 0},
	} {
		if got, ok := tailnettest.MetricSum(m, c.name, c.labels...); !ok || got != c.want {
			t.Errorf("%s%v = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	const warnLine = `level=WARN msg="path MTU too small for relayed packets" ipv4Interface=v0 ipv4MTU=1500 ipv6Interface=v0 ipv6MTU=1360 needIPv4=1348 needIPv6=1368`
	if log := readFile(t, relay.LogPath()); !strings.Contains(log, warnLine) {
		t.Errorf("relay log lacks %q:\n%s", warnLine, log)
	}

	// Fix the IPv6 route; an address change makes the relay look again
	// (see testRelayPathMTU).
	ip("-6", "route", "change", "default", "via", "fd77::2", "dev", "v0", "mtu", "1500")
	ip("addr", "add", "fd77::9/64", "dev", "v0", "nodad")
	const okLine = `level=INFO msg="path MTU ok" ipv4Interface=v0 ipv4MTU=1500 ipv6Interface=v0 ipv6MTU=1500`
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		return strings.Contains(readFile(t, relay.LogPath()), okLine), nil
	}); err != nil {
		t.Fatalf("relay log never said %q after the IPv6 route MTU went to 1500: %v", okLine, err)
	}
	if got, _ := tailnettest.MetricSum(relayMetrics(t, relay), "tsrelay_path_mtu_too_small"); got != 0 {
		t.Errorf("after the IPv6 route MTU went to 1500, tsrelay_path_mtu_too_small = %v, want 0", got)
	}
}

// kubeForRelay starts a real API server with the ServiceAccount, Role and
// RoleBinding the manifests ship, and returns an admin client and the
// environment that points the relay at it as that ServiceAccount.
func kubeForRelay(t *testing.T, ns string) (kubernetes.Interface, []string) {
	t.Helper()
	srv := startWithShippedRBAC(t)
	const secret = "tsrelay-state"
	srv.WaitAllowedForTest(t, ns, "tsrelay",
		authzv1.ResourceAttributes{Namespace: ns, Verb: "get", Resource: "secrets", Name: secret},
		authzv1.ResourceAttributes{Namespace: ns, Verb: "create", Resource: "events"})
	kubeconfig := srv.KubeconfigForTest(t, ns, "tsrelay")
	return srv.AdminClientForTest(t), []string{"KUBECONFIG=" + kubeconfig, "TS_KUBE_SECRET=" + secret}
}

func bit(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
