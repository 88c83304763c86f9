package relaycheck

import (
	"net/netip"
	"reflect"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"
)

func TestParsePeerRelay(t *testing.T) {
	tests := []struct {
		in      string
		wantEP  string
		wantVNI uint32
		wantErr bool
	}{
		{"203.0.113.7:61441:vni:57", "203.0.113.7:61441", 57, false},
		{"[fd7a:115c:a1e0::1]:41641:vni:1", "[fd7a:115c:a1e0::1]:41641", 1, false},
		{"203.0.113.7:61441", "", 0, true},
		{"203.0.113.7:61441:vni:x", "", 0, true},
		{"relay:61441:vni:1", "", 0, true},
	}
	for _, tt := range tests {
		ep, vni, err := parsePeerRelay(tt.in)
		if tt.wantErr {
			if err == nil {
				t.Errorf("parsePeerRelay(%q) = %v, %d, want an error", tt.in, ep, vni)
			}
			continue
		}
		if err != nil || ep.String() != tt.wantEP || vni != tt.wantVNI {
			t.Errorf("parsePeerRelay(%q) = %v, %d, %v; want %s, %d", tt.in, ep, vni, err, tt.wantEP, tt.wantVNI)
		}
	}
}

func TestPathOf(t *testing.T) {
	tests := []struct {
		pr   ipnstate.PingResult
		want string
	}{
		{ipnstate.PingResult{DERPRegionID: 4, DERPRegionCode: "fra"}, "DERP(fra)"},
		{ipnstate.PingResult{DERPRegionID: 900}, "DERP(900)"},
		{ipnstate.PingResult{PeerRelay: "203.0.113.7:61441:vni:57"}, "peer-relay(203.0.113.7:61441 vni 57)"},
		{ipnstate.PingResult{Endpoint: "192.168.1.20:41641"}, "direct 192.168.1.20:41641"},
	}
	for _, tt := range tests {
		p, err := pathOf(&tt.pr)
		if err != nil || p.String() != tt.want {
			t.Errorf("pathOf(%+v) = %v, %v; want %s", tt.pr, p, err, tt.want)
		}
	}
	if p, err := pathOf(&ipnstate.PingResult{}); err == nil {
		t.Errorf("pathOf(empty result) = %v, want an error", p)
	}
}

var (
	derpFra = path{kind: ViaDERP, region: "fra"}
	relay57 = path{kind: ViaPeerRelay, endpoint: netip.MustParseAddrPort("203.0.113.7:61441"), vni: 57}
	direct  = path{kind: ViaDirect, endpoint: netip.MustParseAddrPort("192.168.1.20:41641")}
)

// pongs builds pongs from (path, latency in ms) pairs, 250 ms apart.
func pongs(pairs ...any) []pong {
	var out []pong
	for i := 0; i < len(pairs); i += 2 {
		out = append(out, pong{
			path:    pairs[i].(path),
			latency: time.Duration(pairs[i+1].(float64) * float64(time.Millisecond)),
			at:      time.Duration(i/2) * 250 * time.Millisecond,
		})
	}
	return out
}

func TestSummarise(t *testing.T) {
	type seg struct {
		path           string
		pongs          int
		minMs, medMs   float64
		firstMs        float64
		kind, endpoint string
	}
	tests := []struct {
		name string
		in   []pong
		want []seg
		text string
	}{
		{"none", nil, nil, ""},
		{
			"DERP then relay then direct",
			pongs(derpFra, 34.0, derpFra, 30.0, relay57, 2.0, relay57, 1.0, relay57, 1.5, direct, 0.4),
			[]seg{
				{"DERP(fra)", 2, 30, 32, 0, ViaDERP, ""},
				{"peer-relay(203.0.113.7:61441 vni 57)", 3, 1, 1.5, 500, ViaPeerRelay, "203.0.113.7:61441"},
				{"direct 192.168.1.20:41641", 1, 0.4, 0.4, 1250, ViaDirect, "192.168.1.20:41641"},
			},
			"DERP(fra) ×2 min 30ms median 32ms → peer-relay(203.0.113.7:61441 vni 57) ×3 min 1.0ms median 1.5ms → direct 192.168.1.20:41641 ×1 min 0.40ms median 0.40ms",
		},
		{
			// A relay that comes and goes shows as separate segments.
			"flapping",
			pongs(derpFra, 30.0, relay57, 2.0, derpFra, 31.0),
			[]seg{
				{"DERP(fra)", 1, 30, 30, 0, ViaDERP, ""},
				{"peer-relay(203.0.113.7:61441 vni 57)", 1, 2, 2, 250, ViaPeerRelay, "203.0.113.7:61441"},
				{"DERP(fra)", 1, 31, 31, 500, ViaDERP, ""},
			},
			"DERP(fra) ×1 min 30ms median 30ms → peer-relay(203.0.113.7:61441 vni 57) ×1 min 2.0ms median 2.0ms → DERP(fra) ×1 min 31ms median 31ms",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			segs := summarise(tt.in)
			var got []seg
			for _, s := range segs {
				got = append(got, seg{s.path.String(), s.Pongs, s.MinMs, s.MedianMs, s.FirstMs, s.Kind, s.Endpoint})
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("summarise = %+v\nwant %+v", got, tt.want)
			}
			if text := pathSequence(segs); text != tt.text {
				t.Errorf("pathSequence = %q\nwant %q", text, tt.text)
			}
		})
	}
}

func TestFmtMs(t *testing.T) {
	for in, want := range map[float64]string{0.423: "0.42ms", 1.64: "1.6ms", 34.4: "34ms", 120: "120ms"} {
		if got := fmtMs(in); got != want {
			t.Errorf("fmtMs(%v) = %q, want %q", in, got, want)
		}
	}
}
