package derpregion

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"tailscale.com/types/key"
)

// Keys of the region's shared state, in the mesh Secret's data or the mesh
// file: the mesh key, as 64 hex digits (what derpserver.SetMeshKey and
// cmd/derper's --mesh-psk-file take), and the region's self-signed
// certificate and its private key (PEM).
const (
	SharedMeshKey  = "mesh-key"
	SharedCertKey  = "tls.crt"
	SharedCertPriv = "tls.key"
)

// Shared is what every node of a region has in common: the mesh key, which
// lets them trust each other, and the certificate, so that the derpMap
// names one CertName for all of them and mesh links pin it.
type Shared struct {
	MeshKey key.DERPMesh
	Cert    *Cert
}

// NewMeshKey returns a random mesh key.
func NewMeshKey() (key.DERPMesh, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return key.DERPMesh{}, fmt.Errorf("derpregion: generate a mesh key: %w", err)
	}
	return key.ParseDERPMesh(hex.EncodeToString(b[:]))
}

// CompleteShared returns data with what is missing added: a random mesh
// key if there is none, a new self-signed certificate if there is none.
// What is there is kept, never replaced; changed reports whether anything
// was added. A value that does not parse is an error (the message never
// includes the key).
func CompleteShared(data map[string][]byte, now time.Time) (out map[string][]byte, changed bool, err error) {
	out = make(map[string][]byte, len(data)+3)
	for k, v := range data {
		out[k] = v
	}
	if _, ok := out[SharedMeshKey]; !ok {
		mk, err := NewMeshKey()
		if err != nil {
			return nil, false, err
		}
		out[SharedMeshKey] = []byte(mk.String())
		changed = true
	}
	_, hasCert := out[SharedCertKey]
	_, hasPriv := out[SharedCertPriv]
	if !hasCert && !hasPriv {
		pemBytes, err := newSelfSigned(now)
		if err != nil {
			return nil, false, err
		}
		crt, priv, _ := strings.Cut(string(pemBytes), "-----BEGIN PRIVATE KEY-----")
		out[SharedCertKey] = []byte(crt)
		out[SharedCertPriv] = []byte("-----BEGIN PRIVATE KEY-----" + priv)
		changed = true
	}
	if _, err := ParseShared(out, now); err != nil {
		return nil, false, err
	}
	return out, changed, nil
}

// ParseShared reads the shared state from data, as CompleteShared leaves
// it.
func ParseShared(data map[string][]byte, now time.Time) (*Shared, error) {
	var errs []error
	mk, err := key.ParseDERPMesh(string(data[SharedMeshKey]))
	if err != nil {
		errs = append(errs, fmt.Errorf("%s: want 64 hexadecimal digits (e.g. from openssl rand -hex 32)", SharedMeshKey))
	}
	crt, priv := data[SharedCertKey], data[SharedCertPriv]
	var cert *Cert
	switch {
	case len(crt) == 0 || len(priv) == 0:
		errs = append(errs, fmt.Errorf("%s and %s: want both, a PEM certificate and its private key, or neither (a new certificate is made)", SharedCertKey, SharedCertPriv))
	default:
		cert, err = parseSelfSigned(append(append([]byte(nil), crt...), priv...))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s and %s: %w", SharedCertKey, SharedCertPriv, err))
		} else if !now.Before(cert.leaf.NotAfter) {
			errs = append(errs, fmt.Errorf("%s: the region's certificate expired on %s; delete %s and %s to make a new one, then update the derpMap", SharedCertKey, cert.leaf.NotAfter.Format(time.DateOnly), SharedCertKey, SharedCertPriv))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("derpregion: shared region state: %w", err)
	}
	return &Shared{MeshKey: mk, Cert: cert}, nil
}
