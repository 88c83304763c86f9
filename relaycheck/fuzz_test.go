package relaycheck

import (
	"strconv"
	"strings"
	"testing"

	"tailscale.com/ipn/ipnstate"
)

// FuzzPathOf classifies ping results whose strings come, through
// tailscaled, from what peers and relays advertise (a relay's endpoint and
// VNI): it must never panic, and a peer-relay path it accepts must print
// back the endpoint and VNI it parsed.
func FuzzPathOf(f *testing.F) {
	f.Add("203.0.113.7:61441:vni:57", "", 0, "")
	f.Add("[2001:db8::1]:61441:vni:1", "", 0, "")
	f.Add("", "192.168.1.20:41641", 0, "")
	f.Add("", "", 1, "fra")
	f.Add("1.2.3.4:5:vni:99999999999", "", 0, "")
	f.Add(":vni:", "", 0, "")
	f.Add("1.2.3.4:5:vni:-1", "garbage", -3, "")
	f.Fuzz(func(t *testing.T, peerRelay, endpoint string, region int, code string) {
		p, err := pathOf(&ipnstate.PingResult{PeerRelay: peerRelay, Endpoint: endpoint, DERPRegionID: region, DERPRegionCode: code})
		if err != nil {
			return
		}
		s := p.String()
		if p.kind == ViaPeerRelay && (!strings.Contains(s, p.endpoint.String()) || !strings.Contains(s, strconv.FormatUint(uint64(p.vni), 10))) {
			t.Fatalf("pathOf(%q) = %q, which lost the endpoint %v or VNI %d", peerRelay, s, p.endpoint, p.vni)
		}
	})
}
