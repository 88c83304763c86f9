package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/ipn/store"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/lease"
)

// TestDERPRegionInAppliance runs the appliance in process with the DERP
// region on: /readyz waits for it, /derpmap serves the derpMap for the
// relay's static endpoint, /metrics has its series, the certificate is kept
// in TS_STATE_DIR, and the tsnet node refuses a DERP client it does not
// know.
func TestDERPRegionInAppliance(t *testing.T) {
	cfg := inProcessConfig(t)
	stunPort, err := tailnettest.FreeUDPPort()
	if err != nil {
		t.Fatal(err)
	}
	derpAddr, err := tailnettest.FreeTCPAddr()
	if err != nil {
		t.Fatal(err)
	}
	derpPort := netip.MustParseAddrPort(derpAddr).Port()
	cfg.LocalAddrPort = ListenAddr(netip.MustParseAddrPort("127.0.0.1:9002"))
	cfg.DERPConfig = DERPConfig{DERPPort: Port(derpPort), STUNPort: Port(stunPort), RegionID: 901, RegionCode: "home", MaxUnadmitted: 256, AcceptRate: 100}
	cfg.LeaseDuration = lease.DefaultDuration
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewTextHandler(t.Output(), nil))
	// The same wiring as Run.
	a := testAppliance(t, cfg, "")
	region901, err := derpregion.Setup(t.Context(), cfg.DERPConfig, a.derpDeps(nil))
	if err != nil {
		t.Fatal(err)
	}
	a.status.setDERP(region901)
	runForTest(t, a, region901.Run)
	// The certificate the region serves and pins, read back from where it
	// is kept.
	certStore, err := store.NewFileStore(t.Logf, filepath.Join(cfg.StateDir, derpregion.CertStateFile))
	if err != nil {
		t.Fatalf("self-signed certificate not kept in TS_STATE_DIR: %v", err)
	}
	cert, err := derpregion.SelfSigned(certStore, time.Now())
	if err != nil || cert.Created() {
		t.Fatalf("self-signed certificate not kept in TS_STATE_DIR (made anew: %v): %v", cert != nil && cert.Created(), err)
	}
	h := nodeHandlers(cfg, a.status, nodeParts{node: a, derp: region901}, logger)
	get := func(path string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		return rec
	}

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	if err := tailnettest.WaitFor(ctx, 50*time.Millisecond, func() (bool, error) { return get("/readyz").Code == 200, nil }); err != nil {
		t.Fatalf("/readyz never 200: %s", get("/readyz").Body)
	}
	rec := get("/derpmap")
	if rec.Code != 200 {
		t.Fatalf("/derpmap = %d %s", rec.Code, rec.Body)
	}
	var m tailcfg.DERPMap
	if err := json.Unmarshal(rec.Body.Bytes(), &m); err != nil {
		t.Fatalf("decode /derpmap: %v\n%s", err, rec.Body)
	}
	r := m.Regions[901]
	if r == nil || len(r.Nodes) != 1 {
		t.Fatalf("/derpmap has no region 901 with one node:\n%s", rec.Body)
	}
	n := r.Nodes[0]
	if n.IPv4 != "127.0.0.1" || n.DERPPort != int(derpPort) || n.STUNPort != stunPort || n.CertName != cert.CertName() || r.RegionCode != "home" {
		t.Errorf("/derpmap node = %+v, want 127.0.0.1, DERP port %d, STUN port %d, %s", n, derpPort, stunPort, cert.CertName())
	}
	var hs tailcfg.DERPMap
	if rec := get("/derpmap?format=headscale"); rec.Code != 200 || yaml.Unmarshal(rec.Body.Bytes(), &hs) != nil || hs.Regions[901] == nil {
		t.Errorf("/derpmap?format=headscale = %d\n%s", rec.Code, rec.Body)
	}
	if rec := get("/derpmap?format=xml"); rec.Code != 400 || !strings.Contains(rec.Body.String(), "want json") {
		t.Errorf("/derpmap?format=xml = %d %s, want 400 naming the formats", rec.Code, rec.Body)
	}
	var verbose readyz.Status
	if err := json.Unmarshal(get("/readyz?verbose").Body.Bytes(), &verbose); err != nil || verbose.DERP == nil {
		t.Fatalf("/readyz?verbose has no derp section: %v", err)
	}
	if d := verbose.DERP; !d.Serving || d.CertName != cert.CertName() || d.DERPMap == nil || d.DERPMap.Regions[901].Nodes[0].IPv4 != "127.0.0.1" {
		t.Errorf("/readyz?verbose derp = %+v, want serving, the pin and the derpMap", d)
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, derpregion.CertStateFile)); err != nil {
		t.Errorf("self-signed certificate not kept in TS_STATE_DIR: %v", err)
	}

	// A stranger, refused by the tsnet node's WhoIsNodeKey.
	region := &tailcfg.DERPRegion{RegionID: 901, RegionCode: "home", Nodes: []*tailcfg.DERPNode{{
		Name: "901a", RegionID: 901, HostName: n.HostName, CertName: n.CertName, IPv4: "127.0.0.1", IPv6: "none", DERPPort: n.DERPPort,
	}}}
	c := derphttp.NewRegionClient(key.NewNode(), t.Logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	defer c.Close()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("TLS and DERP handshake with the pinned certificate: %v", err)
	}
	// Admitted clients get the server's info first; a refused one sees the
	// connection close. c.Close (deferred) ends a Recv that hangs.
	admitted := make(chan bool, 1)
	go func() {
		msg, err := c.Recv()
		_, ok := msg.(derp.ServerInfoMessage)
		admitted <- err == nil && ok
	}()
	select {
	case ok := <-admitted:
		if ok {
			t.Errorf("a node key the tailnet does not know was admitted")
		}
	case <-ctx.Done():
		t.Fatalf("no answer from the DERP server")
	}
	metrics := get("/metrics").Body.String()
	for _, want := range []string{"tsrelay_derp_serving 1", "tsrelay_derp_clients_refused_total 1"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	var lines bytes.Buffer
	for l := range strings.SplitSeq(metrics, "\n") {
		if strings.HasPrefix(l, "tsrelay_derp_") {
			lines.WriteString(l + "\n")
		}
	}
	t.Logf("DERP series:\n%s", lines.String())
}
