package cmdline

import (
	"strings"
	"testing"
)

// TestRun: lines run in order until one fails, and the error names the
// failing line and carries its output.
func TestRun(t *testing.T) {
	dir := t.TempDir()
	err := Run(t.Context(), "mkdir "+dir+"/a", "", "ls "+dir+"/missing", "mkdir "+dir+"/b")
	if err == nil || !strings.HasPrefix(err.Error(), "ls "+dir+"/missing: ") || !strings.Contains(err.Error(), "No such file") {
		t.Fatalf("Run = %v, want the ls line's failure with its output", err)
	}
	if err := Run(t.Context(), "test -d "+dir+"/a"); err != nil {
		t.Errorf("the first line did not run: %v", err)
	}
	if err := Run(t.Context(), "test -d "+dir+"/b"); err == nil {
		t.Error("a line after the failing one ran")
	}
}
