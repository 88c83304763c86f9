package main

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	authzv1 "k8s.io/api/authorization/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// TestRelayReleasesLeaseAtEveryStage stops (SIGTERM, as the kubelet does)
// the real relay binary at each stage of its start-up, against a real
// kube-apiserver with the shipped RBAC, and checks that it exits cleanly
// and leaves the Lease free, so that the next pod need not wait a lease
// duration: waiting on another holder (the Lease stays theirs), just after
// acquiring it (loading the state), once the state is loaded (starting the
// node), with the node unable to reach its control server, waiting for a
// login, and ready.
func TestRelayReleasesLeaseAtEveryStage(t *testing.T) {
	bins := binaries(t)
	srv := startWithShippedRBAC(t)
	admin := srv.AdminClientForTest(t)
	ctx := t.Context()
	const ns, secret = "kube-public", "tsrelay-state"
	srv.WaitAllowedForTest(t, ns, "tsrelay", authzv1.ResourceAttributes{Namespace: ns, Verb: "update", Group: "coordination.k8s.io", Resource: "leases", Name: secret})
	kubeconfig := srv.KubeconfigForTest(t, ns, "tsrelay")
	control := tailnettest.StartControlForTest(t)
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	// A control server that accepts connections and never answers: the
	// node's start-up hangs on it.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan struct{}, 1)
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			select {
			case accepted <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		silent.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})

	env := func(pod, controlURL string, extra ...string) []string {
		return append([]string{
			"KUBECONFIG=" + kubeconfig, "TS_KUBE_SECRET=" + secret, "TS_STATE_DIR=" + t.TempDir(),
			"TS_CONTROL_URL=" + controlURL, fmt.Sprintf("TS_RELAY_SERVER_PORT=%d", port),
			"POD_NAME=" + pod, "POD_NAMESPACE=" + ns, "POD_UID=" + pod + "-uid",
		}, extra...)
	}
	// stop sends SIGTERM and checks the relay exits 0 well within the
	// kubelet's 30 s grace period.
	stop := func(t *testing.T, r *tailnettest.Relay, stage string) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, 25*time.Second)
		defer cancel()
		start := time.Now()
		if err := r.Stop(sctx); err != nil {
			t.Fatalf("stopped %s: exit %v\n%s", stage, err, r.LogTail(30))
		}
		t.Logf("stopped %s in %v", stage, time.Since(start).Round(time.Millisecond))
	}
	holder := func(t *testing.T) string {
		t.Helper()
		l, err := admin.CoordinationV1().Leases(ns).Get(ctx, secret, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("lease: %v", err)
		}
		if l.Spec.HolderIdentity == nil {
			return ""
		}
		return *l.Spec.HolderIdentity
	}
	waitLog := func(t *testing.T, r *tailnettest.Relay, want string) {
		t.Helper()
		wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		if err := tailnettest.WaitFor(wctx, 5*time.Millisecond, func() (bool, error) {
			return strings.Contains(r.LogTail(400), want), nil
		}); err != nil {
			t.Fatalf("the relay never logged %q:\n%s", want, r.LogTail(30))
		}
	}

	t.Run("WaitingOnAnotherHolder", func(t *testing.T) {
		other := "tsrelay-other_other-uid"
		now := metav1.NewMicroTime(time.Now())
		dur := int32(90)
		if _, err := admin.CoordinationV1().Leases(ns).Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: secret},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &other, LeaseDurationSeconds: &dur, AcquireTime: &now, RenewTime: &now},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		defer func() { // free it for the next stages, whatever happens here
			if err := admin.CoordinationV1().Leases(ns).Delete(ctx, secret, metav1.DeleteOptions{}); err != nil {
				t.Error(err)
			}
		}()
		r := startRelay(t, bins, "relay-waiting", env("tsrelay-waiting", control.URL)...)
		waitUnready(t, r, "waiting for the node identity, held by "+other)
		stop(t, r, "while waiting on another holder")
		if got := holder(t); got != other {
			t.Errorf("holder after a waiting relay stopped = %q, want %q still", got, other)
		}
	})

	for _, tc := range []struct {
		name, pod string
		control   string
		authKey   bool
		// reach brings the relay to the stage.
		reach func(t *testing.T, r *tailnettest.Relay)
	}{
		{"JustAcquired", "tsrelay-acquired", control.URL, false, func(t *testing.T, r *tailnettest.Relay) { waitLog(t, r, "lease acquired") }},
		{"StateLoaded", "tsrelay-loaded", control.URL, false, func(t *testing.T, r *tailnettest.Relay) { waitLog(t, r, "kube state loaded") }},
		{"ControlUnanswering", "tsrelay-silent", "http://" + silent.Addr().String(), false, func(t *testing.T, r *tailnettest.Relay) {
			select {
			case <-accepted:
			case <-time.After(60 * time.Second):
				t.Fatal("the relay never dialled its control server")
			}
		}},
		{"WaitingForLogin", "tsrelay-nologin", control.URL, false, func(t *testing.T, r *tailnettest.Relay) { waitUnready(t, r, "NeedsLogin") }},
		{"Ready", "tsrelay-ready", control.URL, true, func(t *testing.T, r *tailnettest.Relay) { waitReady(t, r) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var extra []string
			if tc.authKey {
				extra = append(extra, "TS_AUTHKEY="+control.AuthKey)
			}
			r := startRelay(t, bins, "relay-"+tc.pod, env(tc.pod, tc.control, extra...)...)
			tc.reach(t, r)
			stop(t, r, tc.name)
			if got := holder(t); got != "" {
				t.Errorf("holder after SIGTERM at stage %s = %q, want none: the next pod waits a lease duration\n%s", tc.name, got, r.LogTail(20))
				// Free it for the next stage.
				if err := admin.CoordinationV1().Leases(ns).Delete(ctx, secret, metav1.DeleteOptions{}); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestRelayRecreatesDeletedStateSecret deletes the state Secret while the
// real relay runs, against a real kube-apiserver with the shipped RBAC: the
// relay must create it again at once from memory (and say so in an Event
// and a metric), so that a restart afterwards comes back as the same node,
// with no auth key.
func TestRelayRecreatesDeletedStateSecret(t *testing.T) {
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
	env := []string{
		"KUBECONFIG=" + kubeconfig, "TS_KUBE_SECRET=" + secret, "TS_CONTROL_URL=" + control.URL,
		fmt.Sprintf("TS_RELAY_SERVER_PORT=%d", port),
		"POD_NAME=tsrelay-1", "POD_NAMESPACE=" + ns, "POD_UID=tsrelay-1-uid",
	}
	relay := startRelay(t, bins, "relay", append(env, "TS_STATE_DIR="+t.TempDir(), "TS_AUTHKEY="+control.AuthKey)...)
	waitReady(t, relay)
	rs, err := relay.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs.TailscaleIPs) == 0 {
		t.Fatalf("relay has no tailnet IPs: %+v", rs)
	}
	before, err := admin.CoreV1().Secrets(ns).Get(ctx, secret, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nodes := control.Server.NumNodes()

	if err := admin.CoreV1().Secrets(ns).Delete(ctx, secret, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := tailnettest.WaitFor(wctx, 10*time.Millisecond, func() (bool, error) {
		s, err := admin.CoreV1().Secrets(ns).Get(wctx, secret, metav1.GetOptions{})
		return err == nil && s.UID != before.UID, nil
	}); err != nil {
		t.Fatalf("the state Secret was not re-created %v after it was deleted: %v", time.Since(deleted).Round(time.Millisecond), err)
	}
	t.Logf("state Secret re-created %v after the delete", time.Since(deleted).Round(time.Millisecond))
	after, err := admin.CoreV1().Secrets(ns).Get(ctx, secret, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range before.Data {
		if string(after.Data[k]) != string(v) {
			t.Errorf("re-created Secret: key %s differs from before the delete", k)
		}
	}
	waitEvents(t, admin, ns, "tsrelay-1", map[string]int32{"StateLoaded": 1, "LoggedIn": 1, "RelayBound": 1, "StateSecretRecreated": 1})
	if fams, err := relay.Metrics(ctx); err != nil {
		t.Error(err)
	} else if v, _ := tailnettest.MetricSum(fams, "tsrelay_state_secret_recreated_total"); v != 1 {
		t.Errorf("tsrelay_state_secret_recreated_total = %v, want 1", v)
	}
	if !strings.Contains(relay.LogTail(100), "kube state secret was deleted") {
		t.Errorf("the relay's log does not say the Secret was deleted:\n%s", relay.LogTail(20))
	}

	// A restart as the same pod, with no key and a new scratch
	// directory: only the re-created Secret can bring the node back.
	if err := relay.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	control.AllowRegisterWithoutKey()
	again := startRelay(t, bins, "relay-again", append(env, "TS_STATE_DIR="+t.TempDir())...)
	waitReady(t, again)
	rs2, err := again.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs2.TailscaleIPs) == 0 || rs2.TailscaleIPs[0] != rs.TailscaleIPs[0] {
		t.Errorf("after the delete and a restart the relay has IPs %v, want %v: it came back as another node", rs2.TailscaleIPs, rs.TailscaleIPs)
	}
	if n := control.Server.NumNodes(); n != nodes {
		t.Errorf("control has %d nodes after the restart, want %d", n, nodes)
	}
}
