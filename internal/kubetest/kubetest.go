// Package kubetest runs a real Kubernetes control plane, etcd and
// kube-apiserver, on loopback for tests: real RBAC, real admission
// (PodSecurity included), real ServiceAccount tokens.
//
// It is a small helper of our own rather than controller-runtime's envtest.
// envtest would bring controller-runtime and its dependencies into go.mod,
// tie our client-go version to a controller-runtime release, and still need
// flags of ours for RBAC and ServiceAccount token signing; what it would
// save us is the hundred-odd lines below that write certificates and start
// two processes.
//
// The binaries come from scripts/kube-test-bins, which `make test` runs: it
// installs etcd from Debian's packages and builds kube-apiserver once per
// machine into a cache outside the repository.
package kubetest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// Version is the kube-apiserver release scripts/kube-test-bins builds; it
// matches k8s.io/client-go in go.mod.
const Version = "v1.37.2"

// AssetsEnv names the variable that points at the directory holding etcd
// and kube-apiserver. `make test` sets it to what scripts/kube-test-bins
// prints.
const AssetsEnv = "TSRELAY_KUBE_ASSETS"

// startTimeout bounds Start: etcd and kube-apiserver are ready within
// seconds on an idle machine, but far later on one busy building binaries,
// and a slow start is not a failure of the code under test.
const startTimeout = 2 * time.Minute

// Assets returns the directory holding etcd and kube-apiserver: $TSRELAY_KUBE_ASSETS,
// or else the cache scripts/kube-test-bins fills. The error says how to get
// them.
func Assets() (string, error) {
	dir := os.Getenv(AssetsEnv)
	if dir == "" {
		cache := os.Getenv("TSRELAY_CACHE")
		if cache == "" {
			base, err := os.UserCacheDir()
			if err != nil {
				return "", fmt.Errorf("%s is not set and there is no user cache dir: %w", AssetsEnv, err)
			}
			cache = filepath.Join(base, "tsrelay")
		}
		dir = filepath.Join(cache, "kube-"+Version)
	}
	for _, bin := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(dir, bin)); err != nil {
			return "", fmt.Errorf("no %s in %s: run `make test`, or run scripts/kube-test-bins once and set %s to the directory it prints", bin, dir, AssetsEnv)
		}
	}
	return dir, nil
}

// Server is a running etcd and kube-apiserver.
type Server struct {
	// URL is the API server's address, https://127.0.0.1:<port>.
	URL string
	// CA is the PEM certificate that signed the serving certificate.
	CA []byte
	// Admin is a client config for a member of system:masters.
	Admin *rest.Config
	// CAFile holds CA, and ServiceAccountKeyFile the key that signs and
	// verifies ServiceAccount tokens: what kube-controller-manager needs
	// (--root-ca-file, --service-account-private-key-file).
	CAFile, ServiceAccountKeyFile string

	dir       string
	etcd      *tailnettest.Process
	apiserver *tailnettest.Process
	// apiConfig starts kube-apiserver again (StartAPIServer).
	apiConfig tailnettest.ProcessConfig
}

// Options are the ways a Server can differ from Start's: for a whole
// cluster (internal/kubecluster) rather than an API server alone.
type Options struct {
	// NetnsPath, if set, is the network namespace (a file such as
	// /run/netns/NAME) etcd and kube-apiserver run in.
	NetnsPath string
	// Address is where kube-apiserver listens, on port 6443, and what it
	// advertises as the "kubernetes" Service's endpoint; its serving
	// certificate names it and the Service's cluster IP, 10.96.0.1. Unset,
	// it listens on a free port of 127.0.0.1 and the Service has no
	// endpoints.
	Address netip.Addr
	// Args are added to kube-apiserver's flags.
	Args []string
}

// Start starts etcd and kube-apiserver from assets (see Assets), keeping
// their data, certificates and logs in dir, and returns once the API server
// is ready and has created its system namespaces (kube-public among them).
// The caller must Close the Server.
func Start(ctx context.Context, assets, dir string) (*Server, error) {
	return StartWith(ctx, assets, dir, Options{})
}

// StartWith is Start with options.
func StartWith(ctx context.Context, assets, dir string, opts Options) (_ *Server, err error) {
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	s := &Server{dir: dir}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	sans := []net.IP{net.IPv4(127, 0, 0, 1)}
	if opts.Address.IsValid() {
		sans = append(sans, opts.Address.AsSlice(), net.ParseIP(kubernetesServiceIP))
	}
	pki, err := writePKI(dir, sans)
	if err != nil {
		return nil, err
	}
	s.CA = pki.ca
	s.CAFile, s.ServiceAccountKeyFile = pki.caFile, pki.saKey

	etcdClient, err := tailnettest.FreeTCPAddr()
	if err != nil {
		return nil, err
	}
	etcdPeer, err := tailnettest.FreeTCPAddr()
	if err != nil {
		return nil, err
	}
	clientURL, peerURL := "http://"+etcdClient, "http://"+etcdPeer
	s.etcd, err = tailnettest.StartProcess(ctx, tailnettest.ProcessConfig{
		Name: "etcd",
		Path: filepath.Join(assets, "etcd"),
		Args: []string{
			"--name=kubetest",
			"--data-dir=" + filepath.Join(dir, "etcd"),
			"--listen-client-urls=" + clientURL,
			"--advertise-client-urls=" + clientURL,
			"--listen-peer-urls=" + peerURL,
			"--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=kubetest=" + peerURL,
			"--log-level=warn",
		},
		LogFile:   filepath.Join(dir, "etcd.log"),
		NetnsPath: opts.NetnsPath,
	})
	if err != nil {
		return nil, err
	}

	apiAddr, err := tailnettest.FreeTCPAddr()
	if err != nil {
		return nil, err
	}
	addrArgs := []string{
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// The reconciler refuses a loopback address for the
		// "kubernetes" Service's endpoints, which nothing here uses.
		"--endpoint-reconciler-type=none",
	}
	if opts.Address.IsValid() {
		apiAddr = netip.AddrPortFrom(opts.Address, 6443).String()
		addrArgs = []string{"--bind-address=" + opts.Address.String(), "--advertise-address=" + opts.Address.String()}
	}
	_, apiPort, _ := net.SplitHostPort(apiAddr)
	s.URL = "https://" + apiAddr
	s.apiConfig = tailnettest.ProcessConfig{
		Name: "kube-apiserver",
		Path: filepath.Join(assets, "kube-apiserver"),
		Args: append(append(addrArgs,
			"--etcd-servers="+clientURL,
			"--secure-port="+apiPort,
			"--cert-dir="+filepath.Join(dir, "certs"),
			"--tls-cert-file="+pki.servingCert,
			"--tls-private-key-file="+pki.servingKey,
			"--token-auth-file="+pki.tokens,
			"--authorization-mode=RBAC",
			// The API server's own address as the issuer, as a cluster
			// with a published issuer has: an OIDC verifier (keyless
			// login's test) then finds the discovery document and the
			// JWKS at the token's iss. Readable anonymously only where
			// a test binds system:unauthenticated to
			// system:service-account-issuer-discovery.
			"--service-account-issuer="+s.URL,
			"--service-account-jwks-uri="+s.URL+"/openid/v1/jwks",
			"--service-account-key-file="+pki.saKey,
			"--service-account-signing-key-file="+pki.saKey,
			// Dual-stack, as the clusters of dual-stack users are, so that
			// a PreferDualStack Service gets both families.
			"--service-cluster-ip-range=10.96.0.0/16,fd00:96::/112",
			// Defaults, named because tests rely on them: PodSecurity
			// admission is on; ServiceAccount admission checks pods' SAs.
			"--enable-admission-plugins=PodSecurity,ServiceAccount",
		), opts.Args...),
		LogFile:   filepath.Join(dir, "kube-apiserver.log"),
		NetnsPath: opts.NetnsPath,
	}
	s.apiserver, err = tailnettest.StartProcess(ctx, s.apiConfig)
	if err != nil {
		return nil, err
	}

	s.Admin = s.Config(pki.adminToken)
	if err := s.waitReady(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// waitReady waits for /readyz and for the kube-public namespace.
func (s *Server) waitReady(ctx context.Context) error {
	cs, err := kubernetes.NewForConfig(s.Admin)
	if err != nil {
		return fmt.Errorf("kube-apiserver client: %w", err)
	}
	var last error
	err = tailnettest.WaitFor(ctx, 100*time.Millisecond, func() (bool, error) {
		for _, p := range []*tailnettest.Process{s.etcd, s.apiserver} {
			select {
			case <-p.Done():
				return false, fmt.Errorf("%s exited: %w", p.Name(), p.Wait(ctx))
			default:
			}
		}
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			last = fmt.Errorf("/readyz: %w: %s", err, body)
			return false, nil
		}
		if _, err := cs.CoreV1().Namespaces().Get(ctx, metav1.NamespacePublic, metav1.GetOptions{}); err != nil {
			last = err
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("kube-apiserver not ready (last: %v): %w\n%s", last, err, s.apiserver.LogTail(30))
	}
	return nil
}

// Config returns a client config that authenticates with bearer token.
func (s *Server) Config(token string) *rest.Config {
	return &rest.Config{
		Host:            s.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: s.CA},
		// Tests create many objects quickly; the default 5 QPS would
		// throttle them.
		QPS:   100,
		Burst: 200,
	}
}

// WriteKubeconfig writes a kubeconfig file for bearer token, with namespace
// as its context's namespace, the way a user or a pod would have one.
func (s *Server) WriteKubeconfig(path, token, namespace string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kubetest"] = &clientcmdapi.Cluster{Server: s.URL, CertificateAuthorityData: s.CA}
	cfg.AuthInfos["kubetest"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["kubetest"] = &clientcmdapi.Context{Cluster: "kubetest", AuthInfo: "kubetest", Namespace: namespace}
	cfg.CurrentContext = "kubetest"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

// StopAPIServer kills kube-apiserver with SIGKILL, as a crash or the
// restart of a control-plane node would, leaving etcd and its data alone.
// Requests fail with "connection refused" until StartAPIServer.
func (s *Server) StopAPIServer() { s.apiserver.Kill() }

// StartAPIServer starts kube-apiserver again, on the same address, with the
// same certificates and tokens, after StopAPIServer, and returns once it is
// ready.
func (s *Server) StartAPIServer(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	p, err := tailnettest.StartProcess(ctx, s.apiConfig)
	if err != nil {
		return err
	}
	s.apiserver = p
	return s.waitReady(ctx)
}

// Close stops the API server, then etcd.
func (s *Server) Close() error {
	var errs []error
	for _, p := range []*tailnettest.Process{s.apiserver, s.etcd} {
		if p != nil {
			errs = append(errs, p.Close())
		}
	}
	return errors.Join(errs...)
}

// LogTail returns the last n lines of the API server's log, for failure
// messages.
func (s *Server) LogTail(n int) string { return s.apiserver.LogTail(n) }

// kubernetesServiceIP is the "kubernetes" Service's cluster IP: the first
// address of --service-cluster-ip-range.
const kubernetesServiceIP = "10.96.0.1"

// pkiFiles are the files writePKI wrote.
type pkiFiles struct {
	ca                      []byte // PEM
	caFile                  string
	servingCert, servingKey string
	saKey                   string // signs and verifies ServiceAccount tokens
	tokens                  string // --token-auth-file
	adminToken              string
}

// writePKI writes a CA, a serving certificate for sans (and localhost)
// signed by it, a ServiceAccount signing key and a token file with one
// admin, into dir.
func writePKI(dir string, sans []net.IP) (pkiFiles, error) {
	var p pkiFiles
	ca, err := NewCA("kubetest-ca")
	if err != nil {
		return p, err
	}
	p.ca = ca.PEM
	servingCert, servingKey, err := ca.Issue(x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: sans,
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
	})
	if err != nil {
		return p, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return p, fmt.Errorf("service account key: %w", err)
	}
	token := make([]byte, 16)
	rand.Read(token)
	p.adminToken = hex.EncodeToString(token)

	p.caFile = filepath.Join(dir, "ca.crt")
	p.servingCert = filepath.Join(dir, "serving.crt")
	p.servingKey = filepath.Join(dir, "serving.key")
	p.saKey = filepath.Join(dir, "sa.key")
	p.tokens = filepath.Join(dir, "tokens.csv")
	files := []struct {
		path string
		data []byte
	}{
		{p.caFile, p.ca},
		{p.servingCert, servingCert},
		{p.servingKey, servingKey},
		{p.saKey, ecPEM(saKey)},
		{p.tokens, []byte(p.adminToken + `,kubetest-admin,kubetest-admin,"system:masters"` + "\n")},
	}
	for _, f := range files {
		if f.data == nil {
			return p, fmt.Errorf("encode %s", f.path)
		}
		if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
			return p, err
		}
	}
	return p, nil
}

func ecPEM(k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}
