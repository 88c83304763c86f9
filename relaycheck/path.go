package relaycheck

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"tailscale.com/ipn/ipnstate"
)

// The kinds of path a pong can come back on, as they appear in the JSON
// report's "via" and "kind" fields.
const (
	ViaDERP      = "derp"
	ViaPeerRelay = "peer-relay"
	ViaDirect    = "direct"
	ViaNone      = "none" // no pong at all
)

// path is the way one pong came back.
type path struct {
	kind     string         // ViaDERP, ViaPeerRelay or ViaDirect
	region   string         // DERP region code, for ViaDERP
	endpoint netip.AddrPort // the relay's or the peer's UDP endpoint
	vni      uint32         // the relay session's VNI, for ViaPeerRelay
}

// pathOf classifies a successful ping result the way `tailscale ping`
// prints it: peer relay first, then a direct endpoint, then DERP.
func pathOf(pr *ipnstate.PingResult) (path, error) {
	switch {
	case pr.PeerRelay != "":
		ep, vni, err := parsePeerRelay(pr.PeerRelay)
		if err != nil {
			return path{}, err
		}
		return path{kind: ViaPeerRelay, endpoint: ep, vni: vni}, nil
	case pr.Endpoint != "":
		ep, err := netip.ParseAddrPort(pr.Endpoint)
		if err != nil {
			return path{}, fmt.Errorf("pong endpoint %q: %w", pr.Endpoint, err)
		}
		return path{kind: ViaDirect, endpoint: ep}, nil
	case pr.DERPRegionID != 0:
		return path{kind: ViaDERP, region: cmp.Or(pr.DERPRegionCode, strconv.Itoa(pr.DERPRegionID))}, nil
	}
	return path{}, fmt.Errorf("pong says neither DERP, peer relay nor endpoint")
}

// parsePeerRelay parses PingResult.PeerRelay, "ip:port:vni:N" (the IP in
// brackets if IPv6).
func parsePeerRelay(s string) (netip.AddrPort, uint32, error) {
	addr, vni, ok := strings.Cut(s, ":vni:")
	if !ok {
		return netip.AddrPort{}, 0, fmt.Errorf("peer relay %q: want ip:port:vni:N", s)
	}
	ep, err := netip.ParseAddrPort(addr)
	if err != nil {
		return netip.AddrPort{}, 0, fmt.Errorf("peer relay %q: %w", s, err)
	}
	n, err := strconv.ParseUint(vni, 10, 32)
	if err != nil {
		return netip.AddrPort{}, 0, fmt.Errorf("peer relay %q: bad VNI: %w", s, err)
	}
	return ep, uint32(n), nil
}

// String is the path as the human report prints it:
// DERP(fra), peer-relay(203.0.113.7:61441 vni 57), direct 192.168.1.20:41641.
func (p path) String() string {
	s := Segment{Kind: p.kind, DERPRegion: p.region, VNI: p.vni}
	if p.endpoint.IsValid() {
		s.Endpoint = p.endpoint.String()
	}
	return s.pathString()
}

// pong is one answered ping.
type pong struct {
	path    path
	latency time.Duration
	at      time.Duration // when it arrived, since the check started
}

// Segment is a run of consecutive pongs on one path.
type Segment struct {
	Kind       string  `json:"kind"`                 // "derp", "peer-relay" or "direct"
	DERPRegion string  `json:"derpRegion,omitempty"` // for derp: the region code
	Endpoint   string  `json:"endpoint,omitempty"`   // for peer-relay and direct: ip:port
	VNI        uint32  `json:"vni,omitempty"`        // for peer-relay
	Pongs      int     `json:"pongs"`
	MinMs      float64 `json:"minMs"`
	MedianMs   float64 `json:"medianMs"`
	FirstMs    float64 `json:"firstMs"` // first pong on this path, since the check started

	path      path
	latencies []time.Duration
}

// summarise folds pongs, in arrival order, into segments: consecutive
// pongs on the same path (same relay endpoint and VNI, same DERP region,
// same direct endpoint) make one segment; a path seen again later starts a
// new one, so the sequence shows flapping.
func summarise(pongs []pong) []Segment {
	var segs []Segment
	for _, p := range pongs {
		if n := len(segs); n > 0 && segs[n-1].path == p.path {
			segs[n-1].latencies = append(segs[n-1].latencies, p.latency)
			continue
		}
		segs = append(segs, Segment{path: p.path, latencies: []time.Duration{p.latency}, FirstMs: ms(p.at)})
	}
	for i := range segs {
		s := &segs[i]
		s.Kind = s.path.kind
		s.DERPRegion = s.path.region
		if s.path.endpoint.IsValid() {
			s.Endpoint = s.path.endpoint.String()
		}
		s.VNI = s.path.vni
		s.Pongs = len(s.latencies)
		sorted := slices.Sorted(slices.Values(s.latencies))
		s.MinMs = ms(sorted[0])
		s.MedianMs = ms(median(sorted))
	}
	return segs
}

// median of sorted durations; the mean of the middle two for an even count.
func median(sorted []time.Duration) time.Duration {
	n := len(sorted)
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

// ms is d in milliseconds, rounded to microseconds for a stable JSON.
func ms(d time.Duration) float64 {
	return float64(d.Round(time.Microsecond)) / float64(time.Millisecond)
}

// pathString is the segment's path as path.String prints it, from the
// exported fields, so that a report read back from JSON prints the same.
func (s Segment) pathString() string {
	switch s.Kind {
	case ViaDERP:
		return "DERP(" + s.DERPRegion + ")"
	case ViaPeerRelay:
		return fmt.Sprintf("peer-relay(%s vni %d)", s.Endpoint, s.VNI)
	case ViaDirect:
		return "direct " + s.Endpoint
	}
	return s.Kind
}

// pathSequence is the human form of segs:
// "DERP(fra) ×2 min 30ms median 31ms → peer-relay(…) ×8 min 1.1ms median 1.6ms".
func pathSequence(segs []Segment) string {
	parts := make([]string, len(segs))
	for i, s := range segs {
		parts[i] = fmt.Sprintf("%s ×%d min %s median %s", s.pathString(), s.Pongs, fmtMs(s.MinMs), fmtMs(s.MedianMs))
	}
	return strings.Join(parts, " → ")
}

// fmtMs prints a latency with a precision that suits it: 0.42ms, 1.6ms, 34ms.
func fmtMs(v float64) string {
	switch {
	case v < 1:
		return strconv.FormatFloat(v, 'f', 2, 64) + "ms"
	case v < 10:
		return strconv.FormatFloat(v, 'f', 1, 64) + "ms"
	}
	return strconv.FormatFloat(v, 'f', 0, 64) + "ms"
}
