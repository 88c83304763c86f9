package derpregion

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"sync"
	"time"

	"tailscale.com/ipn"
)

// Store keeps the self-signed certificate between runs. It is the part of
// ipn.StateStore this package needs, so the relay's state Secret
// (kubestate.Store) or a file store (tailscale.com/ipn/store.FileStore)
// holds it next to the node's identity.
type Store interface {
	// ReadState returns ipn.ErrStateNotExist for a key never written.
	ReadState(id ipn.StateKey) ([]byte, error)
	WriteState(id ipn.StateKey, bs []byte) error
}

// CertStateKey is the Store key of the self-signed certificate and its
// private key (PEM).
const CertStateKey ipn.StateKey = "_tsrelay-derp-tls"

// SelfSignedHostName is the one name in the self-signed certificate, and the
// HostName of the DERP node in the generated derpMap.
//
// Not an IP address, on purpose: a Tailscale client pinning a certificate
// by hash (CertName "sha256-raw:…") still checks that the certificate is
// valid for the TLS server name, which is the node's HostName
// (tlsdial.SetConfigExpectedCertHash and derphttp.Client.tlsClient at
// v1.102.5, checked 2026-12). A certificate naming the load-balancer IPs
// would have to change, and with it the pinned fingerprint, whenever the
// load balancer hands out another address. With a fixed name the
// certificate never changes; clients dial the node's IPv4/IPv6 literals
// and do not resolve HostName (the .invalid top-level domain never
// resolves anyway). When the address changes, only the derpMap's IPv4/IPv6
// fields change.
const SelfSignedHostName = "derp.tsrelay.invalid"

// selfSignedValidity is how long a self-signed certificate lasts. Clients
// check its dates even when pinning by hash, and a new certificate means a
// new fingerprint to paste into the policy file, so it is long. The one
// year that cmd/derper uses is for certificates that platform verifiers
// check; pinned certificates never reach them.
const selfSignedValidity = 10 * 365 * 24 * time.Hour

// clockSkew backdates a new certificate, so that a client whose clock is a
// little behind the relay's does not find it "not yet valid".
const clockSkew = 24 * time.Hour

// Cert is the DERP server's TLS certificate and what a client must be told
// to trust it.
type Cert struct {
	// HostName is the TLS server name clients must use: the DERP node's
	// HostName in the derpMap.
	HostName string

	selfSigned bool
	created    bool

	mu   sync.Mutex
	cert *tls.Certificate
	leaf *x509.Certificate
	// For a certificate from files: reloaded when they change, so a
	// renewed Secret (cert-manager) is served without a restart.
	certFile, keyFile string
	modTime           time.Time
}

// CertName is the derpMap's DERPNode.CertName: "sha256-raw:<hex>" for a
// self-signed certificate, empty for a user-provided one (clients verify
// it against their roots and HostName).
func (c *Cert) CertName() string {
	if !c.selfSigned {
		return ""
	}
	return "sha256-raw:" + c.Fingerprint()
}

// Fingerprint is the hex SHA-256 of the certificate (DER), as clients
// compute it for a sha256-raw pin.
func (c *Cert) Fingerprint() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	sum := sha256.Sum256(c.leaf.Raw)
	return hex.EncodeToString(sum[:])
}

// NotAfter is when the certificate expires.
func (c *Cert) NotAfter() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leaf.NotAfter
}

// Created reports whether SelfSigned made this certificate now rather than
// finding it in the store: the derpMap's fingerprint is new.
func (c *Cert) Created() bool { return c.created }

func (c *Cert) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"http/1.1"},
		GetCertificate: c.getCertificate,
	}
}

func (c *Cert) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c.certFile != "" {
		// On error keep serving the certificate loaded before: a
		// half-written renewal must not take the region down, and the old
		// certificate is valid until it expires.
		_ = c.reload()
	}
	return c.current(), nil
}

func (c *Cert) current() *tls.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cert
}

// SelfSigned returns the self-signed certificate kept in store, creating
// and storing one (ECDSA P-256, for SelfSignedHostName, valid ten years) if
// there is none or the stored one has expired. A stored value that does not
// parse is an error, not a reason to make a new certificate: that would
// silently invalidate the fingerprint pasted into the tailnet policy.
func SelfSigned(store Store, now time.Time) (*Cert, error) {
	bs, err := store.ReadState(CertStateKey)
	switch {
	case errors.Is(err, ipn.ErrStateNotExist):
	case err != nil:
		return nil, fmt.Errorf("derpregion: read the DERP certificate from state key %s: %w", CertStateKey, err)
	default:
		c, err := parseSelfSigned(bs)
		if err != nil {
			return nil, fmt.Errorf("derpregion: the DERP certificate in state key %s: %w (delete the key to make a new certificate, then update the derpMap)", CertStateKey, err)
		}
		if now.Before(c.leaf.NotAfter) {
			return c, nil
		}
	}
	pemBytes, err := newSelfSigned(now)
	if err != nil {
		return nil, err
	}
	if err := store.WriteState(CertStateKey, pemBytes); err != nil {
		return nil, fmt.Errorf("derpregion: save the new DERP certificate in state key %s: %w", CertStateKey, err)
	}
	c, err := parseSelfSigned(pemBytes)
	if err != nil {
		return nil, fmt.Errorf("derpregion: parse the new DERP certificate: %w", err)
	}
	c.created = true
	return c, nil
}

// newSelfSigned makes a certificate and key, as PEM in one blob.
func newSelfSigned(now time.Time) ([]byte, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("derpregion: generate the DERP certificate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("derpregion: generate a certificate serial number: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: SelfSignedHostName},
		DNSNames:              []string{SelfSignedHostName},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(selfSignedValidity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return nil, fmt.Errorf("derpregion: create the DERP certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("derpregion: encode the DERP certificate key: %w", err)
	}
	var buf bytes.Buffer
	pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	pem.Encode(&buf, &pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	return buf.Bytes(), nil
}

// parseSelfSigned reads a blob written by newSelfSigned.
func parseSelfSigned(bs []byte) (*Cert, error) {
	// X509KeyPair takes the CERTIFICATE blocks from its first argument
	// and the key block from its second, skipping the others.
	tc, err := tls.X509KeyPair(bs, bs)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(tc.Certificate[0])
	if err != nil {
		return nil, err
	}
	if len(leaf.DNSNames) != 1 {
		return nil, fmt.Errorf("certificate names %d hosts, want 1", len(leaf.DNSNames))
	}
	return &Cert{HostName: leaf.DNSNames[0], selfSigned: true, cert: &tc, leaf: leaf}, nil
}

// FromFiles serves the certificate and key in certFile and keyFile (PEM;
// the tls.crt and tls.key of a mounted kubernetes.io/tls Secret), which
// must be valid for hostName, the name clients dial. The files are read
// again when they change, as when cert-manager renews the Secret.
func FromFiles(certFile, keyFile, hostName string) (*Cert, error) {
	if hostName == "" {
		return nil, errors.New("derpregion: a certificate from files needs the host name it is for")
	}
	c := &Cert{HostName: hostName, certFile: certFile, keyFile: keyFile}
	if err := c.reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// reload reads the certificate files if they changed since the last read.
func (c *Cert) reload() error {
	fi, err := os.Stat(c.certFile)
	if err != nil {
		return fmt.Errorf("derpregion: DERP certificate file: %w", err)
	}
	c.mu.Lock()
	unchanged := c.cert != nil && fi.ModTime().Equal(c.modTime)
	c.mu.Unlock()
	if unchanged {
		return nil
	}
	tc, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("derpregion: load the DERP certificate %s and key %s: %w", c.certFile, c.keyFile, err)
	}
	leaf, err := x509.ParseCertificate(tc.Certificate[0])
	if err != nil {
		return fmt.Errorf("derpregion: parse the DERP certificate %s: %w", c.certFile, err)
	}
	if err := leaf.VerifyHostname(c.HostName); err != nil {
		return fmt.Errorf("derpregion: the DERP certificate %s is not for host name %q: %w", c.certFile, c.HostName, err)
	}
	c.mu.Lock()
	c.cert, c.leaf, c.modTime = &tc, leaf, fi.ModTime()
	c.mu.Unlock()
	return nil
}
