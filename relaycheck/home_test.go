package relaycheck

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/ipn/store"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/derpregion"
)

// nobody is a tailnet node that knows no other node: the probe must not
// need admission.
type nobody struct{}

func (nobody) StatusWithoutPeers(context.Context) (*ipnstate.Status, error) {
	return &ipnstate.Status{BackendState: "Running"}, nil
}

func (nobody) WhoIsNodeKey(context.Context, key.NodePublic) (*apitype.WhoIsResponse, error) {
	return nil, local.ErrPeerNotFound
}

// serveRegion runs a real derpregion server on loopback and returns its
// region as a derpMap would give it.
func serveRegion(t *testing.T, id int, code string) *tailcfg.DERPRegion {
	t.Helper()
	st, err := store.NewFileStore(t.Logf, filepath.Join(t.TempDir(), "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := derpregion.SelfSigned(st, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	s, err := derpregion.Listen(derpregion.ServerConfig{DERPAddr: "127.0.0.1:0", STUNAddr: "127.0.0.1:0", TLS: cert, Node: nobody{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	r, err := derpregion.Region(derpregion.RegionOptions{
		RegionID: id, RegionCode: code, Cert: cert,
		Addrs:    []netip.Addr{netip.MustParseAddr("127.0.0.1")},
		DERPPort: int(s.DERPAddr().Port()), STUNPort: int(s.STUNAddr().Port()),
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestHomeRegions(t *testing.T) {
	good := serveRegion(t, 900, "tsrelay")
	// Renamed by the user, still recognised by its self-signed host name.
	renamed := serveRegion(t, 901, "lab")
	renamed.RegionName = "Home lab"
	// The pin of another certificate.
	wrongPin := serveRegion(t, 902, "pinned")
	wrongPin.Nodes[0].CertName = "sha256-raw:" + strings.Repeat("ab", 32)
	// Nothing listening on its ports.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := serveRegion(t, 903, "gone")
	gone.Nodes[0].DERPPort = closed.Addr().(*net.TCPAddr).Port
	closed.Close()

	f := newFake()
	f.derpMap = &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{
		1:   {RegionID: 1, RegionCode: "dfw", RegionName: "Dallas", Nodes: []*tailcfg.DERPNode{{HostName: "derp.example.com"}}},
		900: good, 901: renamed, 902: wrongPin, 903: gone,
	}}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	got := homeRegions(ctx, f, []string{"dfw", "tsrelay", "lab", "pinned", "gone", "", "unknown"})
	// A pong came through "lab" (its admission let this laptop in), none
	// through "tsrelay". These regions' relays know no node (nobody): a
	// real DERP login would be refused; only a pong proves admission.
	confirmAdmission(got, []peerRun{{pongs: []pong{{path: path{kind: ViaDERP, region: "lab"}}, {path: path{kind: ViaDERP, region: "dfw"}}}}})

	for _, tc := range []struct {
		code      string
		id        int
		inCluster bool
		reachable *bool
		reason    string
		line      string
	}{
		{"dfw", 1, false, nil, "", "home DERP region dfw"},
		{"tsrelay", 900, true, nil, "no DERP login by this laptop was seen admitted", "home DERP region tsrelay (in-cluster, served by a tsrelay): admission not confirmed"},
		{"lab", 901, true, new(true), "", "home DERP region lab (in-cluster, served by a tsrelay): reachable from here"},
		{"pinned", 902, true, new(false), "cert hash does not match", "NOT reachable from here"},
		{"gone", 903, true, new(false), "connection refused", "NOT reachable from here"},
		{"unknown", 0, false, nil, "", "home DERP region unknown"},
	} {
		h := got[tc.code]
		if h == nil {
			t.Errorf("%s: no report", tc.code)
			continue
		}
		if h.ID != tc.id || h.InCluster != tc.inCluster || (h.Reachable == nil) != (tc.reachable == nil) ||
			(h.Reachable != nil && *h.Reachable != *tc.reachable) || !strings.Contains(h.Reason, tc.reason) {
			t.Errorf("%s: %+v, want ID %d, in-cluster %v, reachable %v, reason containing %q", tc.code, h, tc.id, tc.inCluster, tc.reachable, tc.reason)
		}
		if l := homeLine(h); !strings.Contains(l, tc.line) {
			t.Errorf("%s: homeLine = %q, want it to contain %q", tc.code, l, tc.line)
		}
	}
	if _, ok := got[""]; ok {
		t.Errorf("a peer without a home region got a report")
	}
}
