package kubeclient

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestNewWithoutConfig(t *testing.T) {
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "missing"))
	t.Setenv("KUBERNETES_SERVICE_HOST", "") // not in a cluster
	_, err := New()
	if err == nil || !strings.Contains(err.Error(), "no kubeconfig found") {
		t.Errorf("New error = %v, want one saying no kubeconfig was found", err)
	}
}
