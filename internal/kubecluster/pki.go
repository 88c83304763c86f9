package kubecluster

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"os"
	"path/filepath"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// kubeletClientPKI are the files through which the API server reaches the
// kubelet (logs, exec): a CA the kubelet trusts and a client certificate
// it signed.
type kubeletClientPKI struct {
	caFile, clientCert, clientKey string
}

// writeKubeletClientPKI writes a CA and a client certificate for the API
// server, in group system:masters, into dir.
func writeKubeletClientPKI(dir string) (kubeletClientPKI, error) {
	var p kubeletClientPKI
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return p, err
	}
	ca, err := kubetest.NewCA("kubelet-client-ca")
	if err != nil {
		return p, err
	}
	cert, key, err := ca.Issue(x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return p, err
	}
	p = kubeletClientPKI{
		caFile:     filepath.Join(dir, "kubelet-client-ca.crt"),
		clientCert: filepath.Join(dir, "kubelet-client.crt"),
		clientKey:  filepath.Join(dir, "kubelet-client.key"),
	}
	for path, data := range map[string][]byte{
		p.caFile:     ca.PEM,
		p.clientCert: cert,
		p.clientKey:  key,
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return p, err
		}
	}
	return p, nil
}
