package kubeevents

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoTypedClients keeps client-go's typed clients, and with them every
// type in k8s.io/api (about 16 MB of binary), out of the package: the reason
// it does not use client-go's tools/record.
func TestNoTypedClients(t *testing.T) {
	out, err := exec.CommandContext(t.Context(), "go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for pkg := range strings.FieldsSeq(string(out)) {
		if strings.HasPrefix(pkg, "k8s.io/api/") || strings.HasPrefix(pkg, "k8s.io/client-go/kubernetes") ||
			strings.HasPrefix(pkg, "k8s.io/client-go/tools/record") || pkg == "testing" {
			t.Errorf("kubeevents links %s", pkg)
		}
	}
}
