package main

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/tsrelay/tsrelay/internal/kubetest"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// TestRelayKubeState runs the real relay binary outside a cluster, with a
// kubeconfig holding a ServiceAccount token from the TokenRequest API and
// only the RBAC that manifests/install.yaml grants, against a real
// kube-apiserver and the in-process tailnet. It checks that the node state
// lands in the Secret, that after kill -9 the relay comes back as the same
// node from the Secret alone (no auth key, as when the user has deleted the
// key Secret), and that the key itself is never stored.
func TestRelayKubeState(t *testing.T) {
	bins := binaries(t)
	srv := kubetest.StartForTest(t)
	admin := srv.AdminClientForTest(t)
	ctx := t.Context()

	// The ServiceAccount, Role and RoleBinding exactly as shipped.
	objs, err := kubetest.ReadManifests(filepath.Join("..", "..", "manifests", "install.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	objs = slices.DeleteFunc(objs, func(o *unstructured.Unstructured) bool {
		return !slices.Contains([]string{"ServiceAccount", "Role", "RoleBinding"}, o.GetKind())
	})
	if len(objs) != 3 {
		t.Fatalf("install.yaml has %d ServiceAccount, Role and RoleBinding objects, want 3", len(objs))
	}
	if err := kubetest.Apply(ctx, srv.Admin, objs, metav1.ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	const ns, secret = "kube-public", "tsrelay-state"
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := srv.WriteKubeconfig(kubeconfig, srv.ServiceAccountTokenForTest(t, ns, "tsrelay"), ns); err != nil {
		t.Fatal(err)
	}

	control := tailnettest.StartControlForTest(t)
	port, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	env := []string{
		"KUBECONFIG=" + kubeconfig,
		"TS_KUBE_SECRET=" + secret,
		"TS_CONTROL_URL=" + control.URL,
		fmt.Sprintf("TS_RELAY_SERVER_PORT=%d", port),
	}
	// Each start gets a new scratch directory, as a new pod gets a new
	// emptyDir: everything that survives must be in the Secret.
	scratch := func() string { return "TS_STATE_DIR=" + t.TempDir() }
	relay := startRelay(t, bins, "relay", append(env, scratch(), "TS_AUTHKEY="+control.AuthKey)...)
	waitReady(t, relay)
	rs, err := relay.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs.TailscaleIPs) == 0 {
		t.Fatalf("relay reports no tailnet IPs: %+v", rs)
	}
	relayIP := rs.TailscaleIPs[0]

	sec, err := admin.CoreV1().Secrets(ns).Get(ctx, secret, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("state secret: %v", err)
	}
	var keys []string
	for k, v := range sec.Data {
		keys = append(keys, k)
		if strings.Contains(string(v), control.AuthKey) {
			t.Errorf("state secret key %s holds the auth key", k)
		}
	}
	slices.Sort(keys)
	// The machine key and a login profile, under encoded names.
	if !slices.Contains(keys, "_machinekey") || len(keys) < 3 {
		t.Errorf("state secret keys = %v, want _machinekey and a profile", keys)
	}
	t.Logf("state secret %s/%s: %d keys %v, resourceVersion %s; relay RSS %s", ns, secret, len(keys), keys, sec.ResourceVersion, rss(relay.Pid()))

	// kill -9: no chance to flush anything. The restart has no key: the
	// Secret alone must bring back the same node.
	nodesBefore := control.Server.NumNodes()
	control.AllowRegisterWithoutKey()
	relay.Kill()
	killedAt := time.Now()
	relay2 := startRelay(t, bins, "relay-restarted", append(env, scratch())...)
	waitReady(t, relay2)
	t.Logf("restarted relay ready %v after kill -9; RSS %s", time.Since(killedAt).Round(time.Millisecond), rss(relay2.Pid()))
	rs2, err := relay2.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs2.TailscaleIPs) == 0 || rs2.TailscaleIPs[0] != relayIP {
		t.Errorf("after kill -9 and restart the relay has IPs %v, want %s", rs2.TailscaleIPs, relayIP)
	}
	if n := control.Server.NumNodes(); n != nodesBefore {
		t.Errorf("control has %d nodes after the restart, want %d: the relay logged in as a new node", n, nodesBefore)
	}

}
