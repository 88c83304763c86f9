package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// TestRelayDERPMesh runs two real relay binaries as the two nodes of one
// meshed DERP region on 127.0.0.1, sharing TS_DERP_MESH_FILE (which the
// first to start creates). Both share the IP, so each finds itself in
// TS_DERP_MESH_PEERS by IP and TS_DERP_PORT. Both become ready, both
// /derpmap list the two nodes with the one shared certificate, and each
// /readyz shows its mesh link to the other connected.
func TestRelayDERPMesh(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	meshFile := filepath.Join(t.TempDir(), "mesh.json")

	type member struct{ relayPort, stunPort, derpPort int }
	var ms [2]member
	for i := range ms {
		var err error
		if ms[i].relayPort, err = tailnettest.FreeUDPPort(); err != nil {
			t.Fatal(err)
		}
		if ms[i].stunPort, err = tailnettest.FreeUDPPort(); err != nil {
			t.Fatal(err)
		}
		addr, err := tailnettest.FreeTCPAddr()
		if err != nil {
			t.Fatal(err)
		}
		ms[i].derpPort = int(netip.MustParseAddrPort(addr).Port())
	}
	peers := "127.0.0.1:" + strconv.Itoa(ms[0].derpPort) + ",127.0.0.1:" + strconv.Itoa(ms[1].derpPort)

	var relays [2]*tailnettest.Relay
	for i, m := range ms {
		name := "relay" + strconv.Itoa(i)
		relays[i] = startRelay(t, bins, name,
			"TS_CONTROL_URL="+control.URL,
			"TS_AUTHKEY="+control.AuthKey,
			"TS_STATE_DIR="+t.TempDir(),
			"TS_HOSTNAME="+name,
			"TS_RELAY_SERVER_PORT="+strconv.Itoa(m.relayPort),
			"TS_RELAY_SERVER_STATIC_ENDPOINTS=127.0.0.1:"+strconv.Itoa(m.relayPort),
			"TS_DERP_PORT="+strconv.Itoa(m.derpPort),
			"TS_STUN_PORT="+strconv.Itoa(m.stunPort),
			"TS_DERP_MESH_FILE="+meshFile,
			"TS_DERP_MESH_PEERS="+peers,
		)
	}
	for _, r := range relays {
		waitReady(t, r)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var certName string
	for i, r := range relays {
		code, body, err := r.Get(ctx, "/derpmap")
		if err != nil || code != http.StatusOK {
			t.Fatalf("relay%d GET /derpmap = %d %v\n%s", i, code, err, body)
		}
		var dm tailcfg.DERPMap
		if err := json.Unmarshal([]byte(body), &dm); err != nil {
			t.Fatalf("relay%d /derpmap: %v\n%s", i, err, body)
		}
		region := dm.Regions[900]
		if region == nil || len(region.Nodes) != 2 {
			t.Fatalf("relay%d /derpmap = %s, want region 900 with 2 nodes", i, body)
		}
		for j, n := range region.Nodes {
			if certName == "" {
				certName = n.CertName
			}
			if !strings.HasPrefix(n.CertName, "sha256-raw:") || n.CertName != certName {
				t.Errorf("relay%d node %d CertName %q, want the one shared certificate %q", i, j, n.CertName, certName)
			}
			if n.IPv4 != "127.0.0.1" || n.DERPPort != ms[j].derpPort {
				t.Errorf("relay%d node %d at %s:%d, want 127.0.0.1:%d (member %d)", i, j, n.IPv4, n.DERPPort, ms[j].derpPort, j)
			}
		}
	}

	// Each relay's only mesh peer is the other, and the link comes up.
	for i, r := range relays {
		other := "127.0.0.1:" + strconv.Itoa(ms[1-i].derpPort)
		var last string
		err := tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
			st, err := r.Status(ctx)
			if err != nil {
				return false, err
			}
			if st.DERP == nil {
				return false, nil
			}
			last = ""
			for _, p := range st.DERP.MeshPeers {
				last += p.Name + " connected=" + strconv.FormatBool(p.Connected) + " " + p.Error + ";"
			}
			return len(st.DERP.MeshPeers) == 1 && st.DERP.MeshPeers[0].Name == other && st.DERP.MeshPeers[0].Connected, nil
		})
		if err != nil {
			t.Errorf("relay%d /readyz meshPeers: %s; want only %s, connected: %v", i, last, other, err)
		}
	}
}
