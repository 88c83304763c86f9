package lbaddr

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoTypedClients keeps client-go's typed clients, and with them every
// type in k8s.io/api (about 16 MB of binary), out of the package.
func TestNoTypedClients(t *testing.T) {
	out, err := exec.CommandContext(t.Context(), "go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for pkg := range strings.FieldsSeq(string(out)) {
		if strings.HasPrefix(pkg, "k8s.io/api/") || strings.HasPrefix(pkg, "k8s.io/client-go/kubernetes") || pkg == "testing" {
			t.Errorf("lbaddr links %s", pkg)
		}
	}
}
