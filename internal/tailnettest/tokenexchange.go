package tailnettest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// TokenExchange is the part of Tailscale's API that workload identity
// federation uses, for a test control (Control.SetAPI): it trusts one
// federated identity (a client ID with an issuer, subject, audience and
// tags), verifies ID tokens the way Tailscale's documentation says its
// servers do (the issuer's OIDC discovery document and JWKS, the
// signature, issuer, audience, subject and expiry), and for a token that
// passes mints the test control's auth key.
//
// Its two endpoints are those tailscale.com/feature/identityfederation
// calls: POST /api/v2/oauth/token-exchange (a form with client_id and
// jwt; an OAuth token response) and POST /api/v2/tailnet/-/keys (a key
// request with the access token as bearer; {"key": ...}). Errors are
// {"message": ...}, as the API's are.
//
// Signatures are checked by hand, for RS256 and ES256 (what kube-apiserver
// signs with, by its key type): the module has no JOSE library.
type TokenExchange struct {
	// ClientID is the federated identity's client ID.
	ClientID string
	// Issuer is the trusted issuer URL; its discovery document is
	// fetched from Issuer + "/.well-known/openid-configuration".
	Issuer string
	// Subject and Audience are what the token's sub must be and its aud
	// must contain.
	Subject, Audience string
	// Tags are those keys may carry.
	Tags []string
	// AuthKey is the key minted for a token that passes.
	AuthKey string
	// HTTPClient fetches the discovery document and the keys; nil means
	// http.DefaultClient.
	HTTPClient *http.Client

	mu        sync.Mutex
	skew      time.Duration     // added to the clock (SetClock)
	access    map[string]bool   // access tokens handed out
	exchanges int               // token exchanges answered with a token
	refusals  []string          // why each refused exchange was refused
	keys      []KeyCapabilities // key requests granted
}

// KeyCapabilities is what a key request asked for.
type KeyCapabilities struct {
	Reusable, Ephemeral, Preauthorized bool
	Tags                               []string
}

// SetClock makes the verifier's clock run d ahead of the real one, so that
// a token can be shown expired without waiting (the TokenRequest API
// issues none shorter than ten minutes).
func (x *TokenExchange) SetClock(d time.Duration) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.skew = d
}

// Exchanges returns how many token exchanges succeeded.
func (x *TokenExchange) Exchanges() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.exchanges
}

// Refusals returns why each refused token exchange was refused, in order.
func (x *TokenExchange) Refusals() []string {
	x.mu.Lock()
	defer x.mu.Unlock()
	return slices.Clone(x.refusals)
}

// Keys returns the key requests granted, in order.
func (x *TokenExchange) Keys() []KeyCapabilities {
	x.mu.Lock()
	defer x.mu.Unlock()
	return slices.Clone(x.keys)
}

// ServeHTTP serves the two endpoints.
func (x *TokenExchange) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/api/v2/oauth/token-exchange":
		x.serveExchange(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/api/v2/tailnet/-/keys":
		x.serveKeys(w, r)
	default:
		apiError(w, http.StatusNotFound, "not found")
	}
}

func apiError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]string{"message": msg})
}

func (x *TokenExchange) serveExchange(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		apiError(w, http.StatusBadRequest, "bad form")
		return
	}
	if err := x.verify(r, r.PostForm.Get("client_id"), r.PostForm.Get("jwt")); err != nil {
		x.mu.Lock()
		x.refusals = append(x.refusals, err.Error())
		x.mu.Unlock()
		apiError(w, http.StatusUnauthorized, err.Error())
		return
	}
	access := "tskey-api-wif-" + rand.Text()
	x.mu.Lock()
	if x.access == nil {
		x.access = map[string]bool{}
	}
	x.access[access] = true
	x.exchanges++
	x.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"access_token": access, "token_type": "Bearer", "expires_in": 3600})
}

func (x *TokenExchange) serveKeys(w http.ResponseWriter, r *http.Request) {
	access, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	x.mu.Lock()
	ok = ok && x.access[access]
	x.mu.Unlock()
	if !ok {
		apiError(w, http.StatusUnauthorized, "invalid access token")
		return
	}
	var req struct {
		Capabilities struct {
			Devices struct {
				Create KeyCapabilities `json:"create"`
			} `json:"devices"`
		} `json:"capabilities"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&req); err != nil {
		apiError(w, http.StatusBadRequest, "bad key request")
		return
	}
	caps := req.Capabilities.Devices.Create
	if len(caps.Tags) == 0 {
		apiError(w, http.StatusBadRequest, "keys created with a federated identity must be tagged")
		return
	}
	for _, tag := range caps.Tags {
		if !slices.Contains(x.Tags, tag) {
			apiError(w, http.StatusForbidden, fmt.Sprintf("tag %q is not allowed for this credential", tag))
			return
		}
	}
	x.mu.Lock()
	x.keys = append(x.keys, caps)
	x.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"id": "k" + rand.Text()[:8], "key": x.AuthKey})
}

// verify checks the client ID and the token.
func (x *TokenExchange) verify(r *http.Request, clientID, token string) error {
	if clientID != x.ClientID {
		return errors.New("unknown client ID")
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return errors.New("ID token is not a JWT")
	}
	var header struct{ Alg, Kid string }
	var claims struct {
		Iss, Sub string
		Aud      json.RawMessage
		Exp, Nbf *float64
	}
	if err := decodeSegment(parts[0], &header); err != nil {
		return fmt.Errorf("ID token header: %w", err)
	}
	if err := decodeSegment(parts[1], &claims); err != nil {
		return fmt.Errorf("ID token claims: %w", err)
	}
	// The issuer is checked before anything is fetched from it.
	if claims.Iss != x.Issuer {
		return fmt.Errorf("token issuer %q is not trusted by this credential", claims.Iss)
	}
	keys, err := x.issuerKeys(r, claims.Iss)
	if err != nil {
		return err
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return errors.New("ID token signature is not base64url")
	}
	if err := verifySignature(header.Alg, header.Kid, keys, parts[0]+"."+parts[1], sig); err != nil {
		return err
	}
	x.mu.Lock()
	now := time.Now().Add(x.skew)
	x.mu.Unlock()
	switch {
	case claims.Exp == nil:
		return errors.New("token has no expiry")
	case !now.Before(time.Unix(int64(*claims.Exp), 0)):
		return fmt.Errorf("token expired at %s", time.Unix(int64(*claims.Exp), 0).UTC().Format(time.RFC3339))
	case claims.Nbf != nil && now.Before(time.Unix(int64(*claims.Nbf), 0)):
		return errors.New("token is not valid yet")
	}
	var auds []string
	if json.Unmarshal(claims.Aud, &auds) != nil {
		var one string
		if json.Unmarshal(claims.Aud, &one) != nil {
			return errors.New("token audience is not a string or a list")
		}
		auds = []string{one}
	}
	if !slices.Contains(auds, x.Audience) {
		return fmt.Errorf("token audience %q does not match this credential's", auds)
	}
	if claims.Sub != x.Subject {
		return fmt.Errorf("token subject %q does not match this credential's", claims.Sub)
	}
	return nil
}

// decodeSegment decodes one base64url JSON part of a JWT.
func decodeSegment(s string, v any) error {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return errors.New("not base64url")
	}
	if err := json.Unmarshal(b, v); err != nil {
		return errors.New("not a JSON object")
	}
	return nil
}

// jwk is one key of a JWKS, RSA or EC.
type jwk struct {
	Kty, Kid, Crv, N, E, X, Y string
}

// issuerKeys fetches the issuer's discovery document, checks that it
// names the issuer, and fetches the keys it points at.
func (x *TokenExchange) issuerKeys(r *http.Request, issuer string) ([]jwk, error) {
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := x.getJSON(r, strings.TrimSuffix(issuer, "/")+"/.well-known/openid-configuration", &doc); err != nil {
		return nil, fmt.Errorf("fetch the issuer's OIDC discovery document: %w", err)
	}
	if doc.Issuer != issuer {
		return nil, fmt.Errorf("the discovery document names issuer %q, not %q", doc.Issuer, issuer)
	}
	var set struct{ Keys []jwk }
	if err := x.getJSON(r, doc.JWKSURI, &set); err != nil {
		return nil, fmt.Errorf("fetch the issuer's JWKS: %w", err)
	}
	return set.Keys, nil
}

func (x *TokenExchange) getJSON(r *http.Request, url string, v any) error {
	req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	hc := x.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: HTTP %d: %s", url, resp.StatusCode, bytes.TrimSpace(b))
	}
	return json.Unmarshal(b, v)
}

// verifySignature checks sig over input with the key named kid (or any
// key of the right type if kid is empty).
func verifySignature(alg, kid string, keys []jwk, input string, sig []byte) error {
	sum := sha256.Sum256([]byte(input))
	for _, k := range keys {
		if kid != "" && k.Kid != kid {
			continue
		}
		switch {
		case alg == "RS256" && k.Kty == "RSA":
			n, err1 := base64.RawURLEncoding.DecodeString(k.N)
			e, err2 := base64.RawURLEncoding.DecodeString(k.E)
			if err1 != nil || err2 != nil {
				continue
			}
			pub := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
			if rsa.VerifyPKCS1v15(pub, crypto.SHA256, sum[:], sig) == nil {
				return nil
			}
		case alg == "ES256" && k.Kty == "EC" && k.Crv == "P-256":
			xb, err1 := base64.RawURLEncoding.DecodeString(k.X)
			yb, err2 := base64.RawURLEncoding.DecodeString(k.Y)
			if err1 != nil || err2 != nil || len(xb) != 32 || len(yb) != 32 || len(sig) != 64 {
				continue
			}
			pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), append(append([]byte{4}, xb...), yb...))
			if err != nil {
				continue
			}
			if ecdsa.Verify(pub, sum[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
				return nil
			}
		}
	}
	return fmt.Errorf("token signature (%s, key %q) does not verify with the issuer's JWKS", alg, kid)
}
