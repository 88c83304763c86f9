package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// childEnv tells a re-run test binary which case to run.
const childEnv = "TSRELAY_TESTENV_CHILD"

// TestSkipUnlessAllowed runs itself in a child process under each setting,
// so the child's skip or failure is observed from outside.
func TestSkipUnlessAllowed(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		SkipUnlessAllowed(t, "no %s here", "widget")
		t.Error("SkipUnlessAllowed returned")
		return
	}
	for _, tc := range []struct {
		name     string
		env      []string
		wantFail bool
		want     string
	}{
		{"Allowed", []string{NoSkipEnv + "=", "CI="}, false, "--- SKIP: TestSkipUnlessAllowed"},
		{"NoSkip", []string{NoSkipEnv + "=1", "CI="}, true, "no widget here (a skip is a failure here: TSRELAY_NO_SKIP=1, as make test sets it)"},
		{"CI", []string{NoSkipEnv + "=", "CI=true"}, true, "no widget here (a skip is a failure here: CI=true)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestSkipUnlessAllowed$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), append(tc.env, childEnv+"=1")...)
			out, err := cmd.CombinedOutput()
			if failed := err != nil; failed != tc.wantFail {
				t.Errorf("child failed: %v, want %v; output:\n%s", failed, tc.wantFail, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("child output lacks %q:\n%s", tc.want, out)
			}
		})
	}
}
