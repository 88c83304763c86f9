package main

import (
	"context"
	"encoding/json"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// TestRelayDERPPinChanged is an identity reset with the DERP region on: the
// tailnet policy's derpMap pins the certificate the relay made at its first
// start, and the relay starts again without its old state, so it makes a
// new certificate that no client will accept. The real relay binary must
// say so loudly (log and /readyz?verbose, with the pin the tailnet holds
// and the one it serves), and `relay derpmap` must print the new map.
func TestRelayDERPPinChanged(t *testing.T) {
	bins := binaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	ports := freeDERPRelayPorts(t)
	// The certificate of the relay's first life, which the policy pins;
	// its state is then gone (the reset).
	region, old := pinnedRegion(t, t.TempDir(), ports)
	control, err := tailnettest.StartControlWith(netip.MustParseAddr("127.0.0.1"), t.Logf, tailnettest.ControlOptions{
		Regions: []*tailcfg.DERPRegion{region},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(control.Close)

	relay := startRelay(t, bins, "relay", append(ports.env(),
		"TS_CONTROL_URL="+control.URL,
		"TS_AUTHKEY="+control.AuthKey,
		"TS_STATE_DIR="+t.TempDir(), // the reset: no old state, so a new certificate
	)...)
	waitReady(t, relay)
	var served, pinned string
	var warnings []string
	err = tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		rs, err := relay.Status(ctx)
		if err != nil || rs.DERP == nil {
			return false, nil
		}
		served, pinned, warnings = rs.DERP.CertName, rs.DERP.TailnetCertName, rs.Warnings
		return pinned != "", nil
	})
	if err != nil {
		t.Fatalf("/readyz?verbose never showed the tailnet's pin: derp.certName %q, derp.tailnetCertName %q, warnings %q: %v", served, pinned, warnings, err)
	}
	if served == old.CertName() || pinned != old.CertName() {
		t.Errorf("derp.certName %q, derp.tailnetCertName %q; want a new certificate and the old pin %q", served, pinned, old.CertName())
	}
	if !slices.ContainsFunc(warnings, func(w string) bool { return strings.Contains(w, "relay derpmap") && strings.Contains(w, pinned) }) {
		t.Errorf("/readyz?verbose warnings %q do not say the pin changed and what to do", warnings)
	}
	if log := relay.LogTail(200); !strings.Contains(log, "pins another certificate") || !strings.Contains(log, "tailnetPin="+pinned) {
		t.Errorf("the relay's log does not say the pin changed:\n%s", relay.LogTail(20))
	}

	// relay derpmap prints the map to paste: the new pin.
	cmd := exec.CommandContext(ctx, bins.Relay, "derpmap")
	cmd.Env = append(tailnettest.ScrubbedEnviron(), "TS_LOCAL_ADDR_PORT="+relay.HTTPAddr)
	printed, err := cmd.Output()
	if err != nil {
		t.Fatalf("relay derpmap: %v", err)
	}
	var got tailcfg.DERPMap
	if err := json.Unmarshal(printed, &got); err != nil {
		t.Fatalf("decode relay derpmap output: %v\n%s", err, printed)
	}
	r := got.Regions[derpregion.DefaultRegionID]
	if r == nil || len(r.Nodes) == 0 || r.Nodes[0].CertName != served {
		t.Errorf("relay derpmap printed\n%s\nwant region %d pinning the served certificate %s", printed, derpregion.DefaultRegionID, served)
	}
}
