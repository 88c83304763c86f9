package keyless

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/ipn/store"
	"tailscale.com/types/key"
)

// The login flow, as the relay runs it: see the package comment.
const (
	// maxIDTokenBytes bounds what is read from TS_ID_TOKEN_FILE; a
	// ServiceAccount token is 1-2 KiB.
	maxIDTokenBytes = 64 << 10
	// retryMin and retryMax bound the wait between refused logins. A
	// refusal is usually a trusted credential still being set up, or a
	// token the kubelet is about to refresh: keep trying, re-reading the
	// file each time.
	retryMin = 2 * time.Second
	retryMax = time.Minute
	// audiencePlaceholder is the audience components/keyless gives the
	// token until the user patches in the credential's. Any audience under
	// the reserved .invalid domain (RFC 2606), such as the stand-in in
	// examples/keyless, is taken for a placeholder too.
	audiencePlaceholder = "tsrelay.invalid/set-the-credential-audience"
)

// Settings are keyless login's settings, as the host read them from its
// environment (the names in messages are the relay's variables).
type Settings struct {
	// ClientID is TS_CLIENT_ID, the federated identity's client ID with
	// ParseClientID's optional suffix. Empty turns keyless login off.
	ClientID string
	// IDToken is TS_ID_TOKEN, the token itself.
	IDToken string
	// IDTokenFile is TS_ID_TOKEN_FILE, the path of the token, re-read at
	// every try: the kubelet rewrites a projected token before it expires.
	IDTokenFile string
	// Tags are TS_ADVERTISE_TAGS, the node's tags.
	Tags []string
	// ControlURL is TS_CONTROL_URL; empty means tsnet's default.
	ControlURL string
	// AuthKeySet and ClientSecretSet say whether TS_AUTHKEY or
	// TS_CLIENT_SECRET is set, the other ways to log in, which keyless
	// login excludes. Their values are never needed.
	AuthKeySet, ClientSecretSet bool
}

// wanted reports whether any keyless-login setting is set.
func (s Settings) wanted() bool {
	return s.ClientID != "" || s.IDToken != "" || s.IDTokenFile != ""
}

// vars names the keyless-login variables that are set, for messages.
func (s Settings) vars() string {
	var set []string
	for _, v := range []struct{ name, val string }{{"TS_CLIENT_ID", s.ClientID}, {"TS_ID_TOKEN", s.IDToken}, {"TS_ID_TOKEN_FILE", s.IDTokenFile}} {
		if v.val != "" {
			set = append(set, v.name)
		}
	}
	return strings.Join(set, ", ")
}

// Validate checks the settings against each other and the other ways to
// log in, and that the token file can be opened; it returns every problem,
// one error each. It never reads the token, nor names its value.
func (s Settings) Validate() []error {
	if !s.wanted() {
		return nil
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if s.AuthKeySet {
		bad("TS_AUTHKEY and keyless login (%s) are both set: want one way to log in; for keyless login delete TS_AUTHKEY (e.g. from the tsrelay-auth Secret)", s.vars())
	}
	if s.ClientSecretSet {
		bad("TS_CLIENT_SECRET and keyless login (%s) are both set: want one way to log in, an OAuth client secret or a federated identity's client ID and token", s.vars())
	}
	if s.ClientID == "" {
		bad("%s needs TS_CLIENT_ID: the client ID of the trusted credential (federated identity) in the Tailscale admin console", s.vars())
	} else if _, _, err := ParseClientID(s.ClientID); err != nil {
		bad("TS_CLIENT_ID=%s: %v; want the credential's client ID, optionally followed by ?ephemeral=true|false&preauthorized=true|false", s.ClientID, err)
	}
	switch {
	case s.IDToken != "" && s.IDTokenFile != "":
		bad("TS_ID_TOKEN and TS_ID_TOKEN_FILE are both set: want one, the token or the path of the projected ServiceAccount token")
	case s.ClientID != "" && s.IDToken == "" && s.IDTokenFile == "":
		bad("TS_CLIENT_ID needs TS_ID_TOKEN_FILE: the path of the pod's projected ServiceAccount token (components/keyless sets it), or TS_ID_TOKEN with a token")
	}
	if len(s.Tags) == 0 {
		bad("keyless login (%s) needs TS_ADVERTISE_TAGS: keys minted through workload identity federation must be tagged with the credential's tags (e.g. TS_ADVERTISE_TAGS=tag:relay)", s.vars())
	}
	if s.IDTokenFile != "" {
		if err := checkReadable(s.IDTokenFile); err != nil {
			bad("TS_ID_TOKEN_FILE=%s: %v; want a readable file, the projected ServiceAccount token (a volume with a serviceAccountToken source)", s.IDTokenFile, err)
		}
	}
	return errs
}

// checkReadable opens path, without reading it, and checks that it is a
// regular file (a projected volume's file is a symlink to one).
func checkReadable(path string) error {
	f, err := os.Open(path)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err // the path is in the message already
		}
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return errors.New("not a regular file")
	}
	return nil
}

// Events records what a login did for people to see (Kubernetes Events);
// a *kubeevents.Recorder, nil or not, is one.
type Events interface {
	Normal(reason, message string)
	Warning(reason, message string)
}

// Node is what Login needs from the node it logs in. SetStatus, Events
// and Logger must be set.
type Node struct {
	// Store is the node's state; nil means tsnet's file store in StateDir
	// (TS_STATE_DIR).
	Store    ipn.StateStore
	StateDir string
	// Logf is tsnet's backend log, which the file store logs to; nil
	// drops it.
	Logf func(format string, args ...any)
	// SetStatus is told why there is no auth key yet while logins are
	// refused, and "" once there is one; /readyz shows it.
	SetStatus func(why string)
	Events    Events
	Logger    *slog.Logger
}

// Login returns the auth key for the node's first login through workload
// identity federation, or "" when keyless login is off or the node state
// already holds a node key: the token is read only when it is needed.
// While the control server refuses, it keeps trying with backoff
// (retryMin to retryMax), re-reading the token each time, and tells
// n.SetStatus why; it returns only with a key, or with ctx's error.
//
// It returns the store it read too: with none given, it opens the file
// store tsnet would, and the host must hand it to tsnet, so that both see
// the same state. Neither the token nor the key is ever logged.
func Login(ctx context.Context, s Settings, n Node) (authKey string, st ipn.StateStore, err error) {
	st = n.Store
	if s.ClientID == "" {
		return "", st, nil
	}
	if st == nil {
		logf := n.Logf
		if logf == nil {
			logf = func(string, ...any) {}
		}
		if st, err = store.New(logf, filepath.Join(n.StateDir, "tailscaled.state")); err != nil {
			return "", nil, fmt.Errorf("open node state in TS_STATE_DIR=%s: %w", n.StateDir, err)
		}
	}
	has, err := hasNodeKey(st)
	if err != nil {
		return "", st, err
	}
	if has {
		n.Logger.Info("keyless login not needed: the node state holds a node key")
		return "", st, nil
	}
	c := &Client{BaseURL: s.controlURL(), ClientID: s.ClientID, Tags: s.Tags}
	wait := retryMin
	var last string
	for {
		claims, key, err := s.mintAuthKey(ctx, c)
		if err == nil {
			n.SetStatus("")
			n.Logger.Info("keyless login: auth key minted through workload identity federation", "token", claims.String())
			n.Events.Normal("KeylessLogin", "auth key minted through workload identity federation for "+claims.Subject)
			return key, st, nil
		}
		if ctx.Err() != nil {
			return "", st, ctx.Err()
		}
		msg := err.Error()
		n.SetStatus(msg)
		if msg != last {
			// A refusal repeats with every retry; log each one once.
			n.Logger.Error("keyless login failed; retrying", "err", msg, "every", "up to "+retryMax.String())
			n.Events.Warning("KeylessLoginFailed", msg)
			last = msg
		}
		select {
		case <-ctx.Done():
			return "", st, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, retryMax)
	}
}

// mintAuthKey reads the token and trades it for an auth key. An error says
// which token was refused by its claims (issuer, subject, audience,
// expiry), which are not secret, never by the token itself.
func (s Settings) mintAuthKey(ctx context.Context, c *Client) (Claims, string, error) {
	token, err := s.readIDToken()
	if err != nil {
		return Claims{}, "", err
	}
	claims, err := ParseClaims(token)
	if err != nil {
		return claims, "", fmt.Errorf("the ID token (%s) is %w", s.tokenSource(), err)
	}
	if i := slices.IndexFunc(claims.Audience, isPlaceholderAudience); i >= 0 {
		return claims, "", fmt.Errorf("the ID token's audience %s is a placeholder: patch the projected volume's audience with the one the trusted credential shows in the admin console (README: Keyless login)", claims.Audience[i])
	}
	key, err := c.AuthKey(ctx, token)
	if err != nil {
		return claims, "", fmt.Errorf("%w (token %s)", err, claims)
	}
	return claims, key, nil
}

// readIDToken returns TS_ID_TOKEN, or what TS_ID_TOKEN_FILE holds now: the
// kubelet rewrites a projected token before it expires.
func (s Settings) readIDToken() (string, error) {
	if s.IDTokenFile == "" {
		return s.IDToken, nil
	}
	f, err := os.Open(s.IDTokenFile)
	if err != nil {
		return "", fmt.Errorf("read TS_ID_TOKEN_FILE: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxIDTokenBytes+1))
	if err != nil {
		return "", fmt.Errorf("read TS_ID_TOKEN_FILE: %w", err)
	}
	if len(b) > maxIDTokenBytes {
		return "", fmt.Errorf("TS_ID_TOKEN_FILE=%s is larger than %d bytes: not a token", s.IDTokenFile, maxIDTokenBytes)
	}
	return strings.TrimSpace(string(b)), nil
}

// tokenSource names where the token came from, for messages.
func (s Settings) tokenSource() string {
	if s.IDTokenFile != "" {
		return "in TS_ID_TOKEN_FILE=" + s.IDTokenFile
	}
	return "in TS_ID_TOKEN"
}

// controlURL is the control server the node logs in to, tsnet's default
// when TS_CONTROL_URL is empty.
func (s Settings) controlURL() string {
	if s.ControlURL != "" {
		return s.ControlURL
	}
	return ipn.DefaultControlURL
}

// hasNodeKey reports whether the state holds a node key for the current
// profile, that is whether the node has logged in before and needs no
// auth key to come back.
func hasNodeKey(s ipn.StateStore) (bool, error) {
	cur, err := s.ReadState(ipn.CurrentProfileStateKey)
	if errors.Is(err, ipn.ErrStateNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read node state: %w", err)
	}
	b, err := s.ReadState(ipn.StateKey(cur))
	if errors.Is(err, ipn.ErrStateNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read node state: %w", err)
	}
	// The profile's prefs; only the node key matters here.
	var prefs struct {
		Config *struct{ PrivateNodeKey key.NodePrivate }
	}
	if err := json.Unmarshal(b, &prefs); err != nil {
		return false, fmt.Errorf("read node state: profile %s: %w", cur, err)
	}
	return prefs.Config != nil && !prefs.Config.PrivateNodeKey.IsZero(), nil
}

// isPlaceholderAudience reports whether aud is components/keyless's
// placeholder or any other audience under the reserved .invalid domain: a
// token meant for no real credential, which is never sent.
func isPlaceholderAudience(aud string) bool {
	host, _, _ := strings.Cut(aud, "/")
	return aud == audiencePlaceholder || strings.HasSuffix(strings.ToLower(host), ".invalid")
}
