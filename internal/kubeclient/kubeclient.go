// Package kubeclient loads the one Kubernetes client the relay uses, for its
// state Secret, its own Service and its Events: a dynamic client, because
// client-go's typed clients link every type in k8s.io/api, which would take
// the binary over its size budget.
package kubeclient

import (
	"fmt"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"
)

// userAgent names tsrelay in the API server's audit log.
const userAgent = "tsrelay"

// Client is a dynamic client and the namespace it works in.
type Client struct {
	Dynamic dynamic.Interface
	// Namespace is the kubeconfig context's namespace, or in a pod
	// POD_NAMESPACE or the ServiceAccount's namespace.
	Namespace string
}

// New builds a client from KUBECONFIG (or ~/.kube/config) or, failing
// those, the in-cluster config. It contacts nothing.
func New() (*Client, error) {
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
		clientcmd.NewDefaultClientConfigLoadingRules(), &clientcmd.ConfigOverrides{})
	cfg, err := cc.ClientConfig()
	if err != nil {
		if clientcmd.IsEmptyConfig(err) {
			return nil, fmt.Errorf("kubernetes: no kubeconfig found (KUBECONFIG, ~/.kube/config) and not running in a cluster: %w", err)
		}
		return nil, fmt.Errorf("kubernetes: load kubeconfig or in-cluster config: %w", err)
	}
	ns, _, err := cc.Namespace()
	if err != nil {
		return nil, fmt.Errorf("kubernetes: find namespace: %w", err)
	}
	cfg.UserAgent = userAgent
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: build client: %w", err)
	}
	return &Client{Dynamic: dc, Namespace: ns}, nil
}
