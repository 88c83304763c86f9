package bench

import (
	"slices"
	"testing"
)

// TestSectionsWhen checks which sections each of cmd/bench's modes runs,
// as bench/README.md documents them.
func TestSectionsWhen(t *testing.T) {
	const (
		unrelayed = scDirect + ", " + scDERP
		relayed   = "relayed paths"
		mtu       = scRelay + ", small pod MTU"
	)
	for _, tc := range []struct {
		mode string
		cfg  Config
		want []string
	}{
		{"full", Config{}, []string{unrelayed, relayed, mtu, "DERP", "failover", "readiness", "HTTP abuse", "DERP abuse", "sizes"}},
		{"-smoke", Config{Smoke: true}, []string{relayed, "failover", "readiness", "HTTP abuse", "sizes"}},
		{"-footprint", Config{FootprintOnly: true}, []string{relayed, "HTTP abuse", "sizes"}},
		{"-failover=false", Config{NoFailover: true}, []string{unrelayed, relayed, mtu, "DERP", "readiness", "HTTP abuse", "DERP abuse", "sizes"}},
		{"-failover-only", Config{FailoverOnly: true}, []string{"failover", "sizes"}},
		{"-abuse-only", Config{AbuseOnly: true}, []string{"HTTP abuse", "DERP abuse", "sizes"}},
		{"-smoke -abuse-only", Config{Smoke: true, AbuseOnly: true}, []string{"HTTP abuse", "sizes"}},
	} {
		var got []string
		for _, s := range sections() {
			if s.when(&tc.cfg) {
				got = append(got, s.name)
			}
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: sections %q, want %q", tc.mode, got, tc.want)
		}
	}
}
