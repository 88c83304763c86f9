package bench

import (
	"os"
	"slices"
	"strings"
	"testing"
)

// TestSectionsWhen checks which sections each of cmd/bench's modes runs,
// as bench/README.md documents them.
func TestSectionsWhen(t *testing.T) {
	const (
		unrelayed = scDirect + ", " + scDERP
		relayed   = "relayed paths"
		mtu       = "small pod MTU"
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

// TestREADMEListsSections checks that bench/README.md has a row for every
// section in its sections table and for every failover case in its
// failover table, so that the docs cannot fall behind the code again.
func TestREADMEListsSections(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	for _, s := range sections() {
		if row := "\n| " + s.name + " |"; !strings.Contains(readme, row) {
			t.Errorf("README.md has no row %q in its sections table", row)
		}
	}
	for _, c := range FailoverCases() {
		if row := "\n| `" + c + "` |"; !strings.Contains(readme, row) {
			t.Errorf("README.md has no row %q in its failover table", row)
		}
	}
}
