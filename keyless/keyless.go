// Package keyless logs a node in without a stored secret: it trades an
// OIDC ID token, such as a pod's projected Kubernetes ServiceAccount token,
// for a one-off Tailscale auth key through workload identity federation.
//
// It does what tailscale.com/feature/identityfederation does (v1.102.5),
// two calls to the control server's API, without that package's import of
// tailscale.com/wif, which links the AWS SDK to detect cloud tokens that a
// Kubernetes pod never has:
//
//  1. POST {control}/api/v2/oauth/token-exchange, a form with client_id and
//     jwt, answered with an OAuth token response whose access_token is a
//     short-lived API token;
//  2. POST {control}/api/v2/tailnet/-/keys with that token, asking for one
//     single-use auth key with the node's tags, answered with the key.
//
// Unlike Tailscale's default (ephemeral, not preauthorized), the key asks
// for a non-ephemeral, preauthorized node: a relay keeps its identity in a
// Secret across restarts, and an ephemeral node is deleted once it goes
// offline. The client ID's optional suffix, as Tailscale's tools accept it
// (?ephemeral=true&preauthorized=false), overrides that.
//
// Every response is treated as hostile: bodies are read up to a bound,
// redirects are refused (a redirected POST could carry the token
// elsewhere), each call has a deadline, and what a server says in an error
// is cut short, stripped of control characters and of any secret it echoes.
//
// Client is the two calls; the rest of the package (login.go) is the
// feature as the relay runs it. The relay reads the Settings from its
// environment and checks them with Settings.Validate along with its own;
// before it starts the node it calls Login, which does nothing when the
// node state already holds a node key, and otherwise reads the token (a
// file at most 64 KiB, re-read at every try), refuses to send one whose
// audience is a placeholder, and retries a refused login with backoff,
// telling the relay's readiness why it has no key yet.
package keyless

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"
)

const (
	// MaxResponseBytes bounds a response body read from the control
	// server. A token response or a key is well under 4 KiB.
	MaxResponseBytes = 64 << 10
	// CallTimeout bounds each of the two calls, connection and body
	// included.
	CallTimeout = 30 * time.Second
	// maxMessage is how much of a server's error message is kept.
	maxMessage = 300
	// maxSecret bounds the access token and the auth key taken from a
	// response.
	maxSecret = 4096
)

// Options are what the auth key asks for, beyond the tags.
type Options struct {
	// Ephemeral makes the node go away once it is offline.
	Ephemeral bool
	// Preauthorized skips device approval, where the tailnet requires it.
	Preauthorized bool
}

// ParseClientID splits a client ID into the ID proper and the options its
// optional query suffix sets (ephemeral, preauthorized: true or false).
// Unset, they are what a relay wants: not ephemeral, so the node outlives
// restarts, and preauthorized, so it needs no approval. It rejects any
// other attribute.
func ParseClientID(s string) (id string, opts Options, err error) {
	opts = Options{Ephemeral: false, Preauthorized: true}
	id, attrs, _ := strings.Cut(s, "?")
	if id == "" {
		return "", opts, errors.New("empty client ID")
	}
	if strings.ContainsFunc(id, func(r rune) bool { return r <= ' ' || r > '~' }) {
		return "", opts, errors.New("client ID has spaces or characters that are not printable ASCII")
	}
	q, err := url.ParseQuery(attrs)
	if err != nil {
		return "", opts, fmt.Errorf("bad attributes after '?': %w", err)
	}
	for k, v := range q {
		var dst *bool
		switch k {
		case "ephemeral":
			dst = &opts.Ephemeral
		case "preauthorized":
			dst = &opts.Preauthorized
		default:
			return "", opts, fmt.Errorf("unknown attribute %q; want ephemeral or preauthorized", k)
		}
		b, err := strconv.ParseBool(v[len(v)-1])
		if err != nil {
			return "", opts, fmt.Errorf("attribute %s=%q: want true or false", k, v[len(v)-1])
		}
		*dst = b
	}
	return id, opts, nil
}

// Client trades ID tokens for auth keys against one control server.
type Client struct {
	// BaseURL is the control server's URL, e.g.
	// https://controlplane.tailscale.com (tsnet's default).
	BaseURL string
	// ClientID is the federated identity's client ID, with the optional
	// suffix ParseClientID reads.
	ClientID string
	// Tags are the node's tags; the key is created with them and the
	// credential must allow them.
	Tags []string
	// HTTP is the client to use; nil means one that follows no redirects.
	// Its Timeout, if any, applies too.
	HTTP *http.Client
	// Timeout bounds each call; zero means CallTimeout.
	Timeout time.Duration
}

// Error is a call the control server refused, or answered with something
// unusable.
type Error struct {
	// Call is what was asked: "token exchange" or "create auth key".
	Call string
	// URL is where it was asked, without query.
	URL string
	// Status is the HTTP status, 0 if none was received.
	Status int
	// Message is what went wrong, cleaned of secrets and control
	// characters.
	Message string
}

// Error says which call failed, where, and why.
func (e *Error) Error() string {
	if e.Status == 0 {
		return fmt.Sprintf("%s at %s: %s", e.Call, e.URL, e.Message)
	}
	return fmt.Sprintf("%s refused by %s (HTTP %d): %s", e.Call, e.URL, e.Status, e.Message)
}

// AuthKey exchanges idToken for an access token, then creates one
// single-use auth key with c.Tags and returns it. Errors never contain the
// ID token, the access token or the key.
func (c *Client) AuthKey(ctx context.Context, idToken string) (string, error) {
	id, opts, err := ParseClientID(c.ClientID)
	if err != nil {
		return "", fmt.Errorf("client ID: %w", err)
	}
	if len(c.Tags) == 0 {
		return "", errors.New("no tags: keys minted through workload identity federation must be tagged")
	}
	idToken = strings.TrimSpace(idToken)
	if idToken == "" {
		return "", errors.New("empty ID token")
	}
	base := strings.TrimRight(c.BaseURL, "/")
	secrets := []string{idToken}

	access, err := c.exchange(ctx, base+"/api/v2/oauth/token-exchange", id, idToken, secrets)
	if err != nil {
		return "", err
	}
	secrets = append(secrets, access)
	return c.createKey(ctx, base+"/api/v2/tailnet/-/keys", access, opts, secrets)
}

// exchange trades the ID token for an access token.
func (c *Client) exchange(ctx context.Context, u, clientID, idToken string, secrets []string) (string, error) {
	form := url.Values{"client_id": {clientID}, "jwt": {idToken}}
	const call = "token exchange"
	body, err := c.post(ctx, call, u, "application/x-www-form-urlencoded", "", strings.NewReader(form.Encode()), secrets)
	if err != nil {
		return "", err
	}
	var resp struct {
		AccessToken string `json:"access_token"`
		TokenType   string `json:"token_type"`
	}
	if err := json.Unmarshal(body, &resp); err != nil {
		return "", &Error{Call: call, URL: u, Status: http.StatusOK, Message: "response is not a JSON token response"}
	}
	if !validSecret(resp.AccessToken) {
		return "", &Error{Call: call, URL: u, Status: http.StatusOK, Message: "response has no usable access_token"}
	}
	if resp.TokenType != "" && !strings.EqualFold(resp.TokenType, "bearer") {
		return "", &Error{Call: call, URL: u, Status: http.StatusOK, Message: fmt.Sprintf("token_type %q, want Bearer", clean(resp.TokenType, secrets))}
	}
	return resp.AccessToken, nil
}

// createKey creates one single-use auth key with the access token.
func (c *Client) createKey(ctx context.Context, u, access string, opts Options, secrets []string) (string, error) {
	type create struct {
		Reusable      bool     `json:"reusable"`
		Ephemeral     bool     `json:"ephemeral"`
		Preauthorized bool     `json:"preauthorized"`
		Tags          []string `json:"tags"`
	}
	var req struct {
		Capabilities struct {
			Devices struct {
				Create create `json:"create"`
			} `json:"devices"`
		} `json:"capabilities"`
	}
	req.Capabilities.Devices.Create = create{Ephemeral: opts.Ephemeral, Preauthorized: opts.Preauthorized, Tags: c.Tags}
	b, err := json.Marshal(req)
	if err != nil {
		return "", fmt.Errorf("encode key request: %w", err)
	}
	const call = "create auth key"
	body, err := c.post(ctx, call, u, "application/json", "Bearer "+access, bytes.NewReader(b), secrets)
	if err != nil {
		return "", err
	}
	var resp struct {
		Key string `json:"key"`
	}
	if err := json.Unmarshal(body, &resp); err != nil {
		return "", &Error{Call: call, URL: u, Status: http.StatusOK, Message: "response is not a JSON key"}
	}
	// Only an auth key: tsnet would trade a tskey-client- secret at
	// another server.
	if !validSecret(resp.Key) || !strings.HasPrefix(resp.Key, "tskey-auth-") {
		return "", &Error{Call: call, URL: u, Status: http.StatusOK, Message: "response has no usable auth key (want tskey-auth-...)"}
	}
	return resp.Key, nil
}

// post sends one request and returns the body of a 200 answer; anything
// else is an *Error, or ctx's error.
func (c *Client) post(ctx context.Context, call, u, contentType, auth string, body io.Reader, secrets []string) ([]byte, error) {
	timeout := cmp.Or(c.Timeout, CallTimeout)
	callCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(callCtx, http.MethodPost, u, body)
	if err != nil {
		return nil, &Error{Call: call, URL: u, Message: "bad URL: " + clean(err.Error(), secrets)}
	}
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "tsrelay-keyless")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := c.httpClient().Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if callCtx.Err() != nil {
			return nil, &Error{Call: call, URL: u, Message: fmt.Sprintf("no answer within %v", timeout)}
		}
		// *url.Error repeats the URL, which may carry nothing secret;
		// the message is cleaned anyway.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, &Error{Call: call, URL: u, Message: clean(err.Error(), secrets)}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxResponseBytes+1))
	switch {
	case ctx.Err() != nil:
		return nil, ctx.Err()
	case callCtx.Err() != nil:
		return nil, &Error{Call: call, URL: u, Status: resp.StatusCode, Message: fmt.Sprintf("response not complete within %v", timeout)}
	case len(b) > MaxResponseBytes:
		return nil, &Error{Call: call, URL: u, Status: resp.StatusCode, Message: fmt.Sprintf("response larger than %d bytes", MaxResponseBytes)}
	case err != nil:
		return nil, &Error{Call: call, URL: u, Status: resp.StatusCode, Message: "reading response: " + clean(err.Error(), secrets)}
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		return b, nil
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		return nil, &Error{Call: call, URL: u, Status: resp.StatusCode, Message: "redirected to " + clean(resp.Header.Get("Location"), secrets) + "; redirects are not followed: set the control URL to the final address"}
	case resp.StatusCode == http.StatusNotFound:
		return nil, &Error{Call: call, URL: u, Status: resp.StatusCode, Message: "no such API here: this control server does not offer workload identity federation (Headscale does not)" + detail(b, secrets)}
	}
	return nil, &Error{Call: call, URL: u, Status: resp.StatusCode, Message: serverMessage(b, secrets)}
}

// httpClient returns c.HTTP, or a default client, that follows no
// redirect.
func (c *Client) httpClient() *http.Client {
	hc := http.Client{}
	if c.HTTP != nil {
		hc = *c.HTTP
	}
	hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &hc
}

// serverMessage is what an error body says: Tailscale's API errors are
// {"message": ...}, OAuth's {"error": ..., "error_description": ...};
// anything else is shown as text.
func serverMessage(b []byte, secrets []string) string {
	var e struct {
		Message     string `json:"message"`
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	if json.Unmarshal(b, &e) == nil {
		var parts []string
		for _, s := range []string{e.Message, e.Error, e.Description} {
			if s != "" {
				parts = append(parts, s)
			}
		}
		if len(parts) > 0 {
			return clean(strings.Join(parts, ": "), secrets)
		}
	}
	if m := clean(string(b), secrets); m != "" {
		return m
	}
	return "empty response"
}

// detail is serverMessage as a suffix, or nothing for an empty body.
func detail(b []byte, secrets []string) string {
	if len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	return " (" + serverMessage(b, secrets) + ")"
}

// clean makes s fit to log and to show in /readyz: every secret it
// echoes (also base64- or URL-encoded) replaced, control characters made
// spaces, and at most maxMessage runes.
func clean(s string, secrets []string) string {
	for _, sec := range secrets {
		if sec == "" {
			continue
		}
		for _, form := range []string{sec, url.QueryEscape(sec), base64.StdEncoding.EncodeToString([]byte(sec))} {
			s = strings.ReplaceAll(s, form, "[redacted]")
		}
	}
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == unicode.ReplacementChar {
			return ' '
		}
		return r
	}, s)
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > maxMessage {
		s = string(r[:maxMessage]) + "…"
	}
	return s
}

// secretRE is what an access token or an auth key may look like: they
// end up in an HTTP header and in tsnet's login.
var secretRE = regexp.MustCompile(`^[A-Za-z0-9._~+/=-]+$`)

func validSecret(s string) bool { return len(s) <= maxSecret && secretRE.MatchString(s) }

// Claims are the parts of an ID token that say whose it is and for whom,
// read without checking its signature: for messages only, to tell a user
// which token a server refused. None of them is secret.
type Claims struct {
	Issuer   string
	Subject  string
	Audience []string
	Expiry   time.Time // zero if the token has none
}

// String formats the claims for a log line or an error.
func (c Claims) String() string {
	s := fmt.Sprintf("iss=%s sub=%s aud=%s", c.Issuer, c.Subject, strings.Join(c.Audience, ","))
	if !c.Expiry.IsZero() {
		s += " exp=" + c.Expiry.UTC().Format(time.RFC3339)
	}
	return s
}

// ParseClaims reads the claims of a JWT without verifying it. Strings are
// cleaned as server messages are, since the token came from a file anyone
// with write access to it could fill.
func ParseClaims(token string) (Claims, error) {
	parts := strings.Split(strings.TrimSpace(token), ".")
	if len(parts) != 3 {
		return Claims{}, fmt.Errorf("not a JWT: %d dot-separated parts, want 3", len(parts))
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return Claims{}, errors.New("not a JWT: payload is not base64url")
	}
	var raw struct {
		Iss string          `json:"iss"`
		Sub string          `json:"sub"`
		Aud json.RawMessage `json:"aud"`
		Exp json.Number     `json:"exp"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return Claims{}, errors.New("not a JWT: payload is not a JSON object of claims")
	}
	c := Claims{Issuer: clean(raw.Iss, nil), Subject: clean(raw.Sub, nil)}
	var one string
	var many []string
	switch {
	case len(raw.Aud) == 0:
	case json.Unmarshal(raw.Aud, &one) == nil:
		c.Audience = []string{clean(one, nil)}
	case json.Unmarshal(raw.Aud, &many) == nil:
		for _, a := range many {
			c.Audience = append(c.Audience, clean(a, nil))
		}
	default:
		return Claims{}, errors.New("not a JWT: aud is neither a string nor a list of strings")
	}
	if raw.Exp != "" {
		f, err := raw.Exp.Float64()
		if err != nil {
			return Claims{}, errors.New("not a JWT: exp is not a number")
		}
		c.Expiry = time.Unix(int64(f), 0)
	}
	return c, nil
}
