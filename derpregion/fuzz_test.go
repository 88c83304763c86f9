package derpregion

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// FuzzServeAdmit sends the admission handler request bodies as derpserver
// would post them, and worse: it must answer every one with 400 or with a
// JSON decision, and admit only a node key the tailnet knows.
func FuzzServeAdmit(f *testing.F) {
	member := key.NewNode().Public()
	good, _ := json.Marshal(tailcfg.DERPAdmitClientRequest{NodePublic: member})
	stranger, _ := json.Marshal(tailcfg.DERPAdmitClientRequest{NodePublic: key.NewNode().Public()})
	f.Add(good)
	f.Add(stranger)
	f.Add([]byte(`{"NodePublic":"nodekey:00"}`))
	f.Add([]byte(`{"NodePublic":"nodekey:` + strings.Repeat("0", 64) + `"}`))
	f.Add([]byte(`{"NodePublic":null,"Source":"1.2.3.4"}`))
	f.Add([]byte(`{"NodePublic":"` + strings.Repeat("a", 5000) + `"}`))
	f.Add([]byte(`[`))
	f.Add([]byte{})
	node := &stubNode{state: ipn.Running, known: map[key.NodePublic]bool{member: true}}
	s := &Server{cfg: ServerConfig{Node: node}, logger: slog.New(slog.DiscardHandler)}
	f.Fuzz(func(t *testing.T, body []byte) {
		w := httptest.NewRecorder()
		s.serveAdmit(w, httptest.NewRequest(http.MethodPost, "/admit", bytes.NewReader(body)))
		switch w.Code {
		case http.StatusBadRequest:
			return
		case http.StatusOK:
		default:
			t.Fatalf("status %d for %q", w.Code, body)
		}
		var resp tailcfg.DERPAdmitClientResponse
		if err := json.Unmarshal(w.Body.Bytes(), &resp); err != nil {
			t.Fatalf("answer %q is not a decision: %v", w.Body.String(), err)
		}
		var req tailcfg.DERPAdmitClientRequest
		json.Unmarshal(body, &req) // what the handler decoded, as far as it matters
		if resp.Allow && req.NodePublic != member {
			t.Fatalf("admitted %v for body %q; only the member may pass", req.NodePublic, body)
		}
	})
}

// FuzzParseShared feeds ParseShared what a Secret or the mesh file may hold
// (anyone with write access to them, or a corrupt file): it must return an
// error or a complete state, never panic.
func FuzzParseShared(f *testing.F) {
	now := time.Now()
	data, _, err := CompleteShared(nil, now)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data[SharedMeshKey], data[SharedCertKey], data[SharedCertPriv])
	f.Add([]byte("zz"), data[SharedCertKey], data[SharedCertPriv])
	f.Add(data[SharedMeshKey], data[SharedCertPriv], data[SharedCertKey])
	f.Add(data[SharedMeshKey], []byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"), []byte("-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte{}, []byte{}, []byte{})
	f.Fuzz(func(t *testing.T, mesh, cert, priv []byte) {
		sh, err := ParseShared(map[string][]byte{SharedMeshKey: mesh, SharedCertKey: cert, SharedCertPriv: priv}, now)
		if err != nil {
			return
		}
		if sh.Cert == nil || sh.Cert.leaf == nil || !now.Before(sh.Cert.leaf.NotAfter) {
			t.Fatalf("ParseShared accepted an incomplete state: %+v", sh)
		}
	})
}
