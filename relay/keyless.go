package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/ipn/store"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/keyless"
)

// Keyless login: the first login trades the pod's projected ServiceAccount
// token for a one-off auth key (workload identity federation; package
// keyless), so that no auth key or OAuth secret sits in the cluster.
const (
	// maxIDTokenBytes bounds what is read from TS_ID_TOKEN_FILE; a
	// ServiceAccount token is 1-2 KiB.
	maxIDTokenBytes = 64 << 10
	// keylessRetryMin and keylessRetryMax bound the wait between refused
	// logins. A refusal is usually a trusted credential still being set
	// up, or a token the kubelet is about to refresh: keep trying, re-reading the
	// file each time.
	keylessRetryMin = 2 * time.Second
	keylessRetryMax = time.Minute
	// keylessAudiencePlaceholder is the audience components/keyless gives
	// the token until the user patches in the credential's.
	keylessAudiencePlaceholder = "tsrelay.invalid/set-the-credential-audience"
)

// wantsKeyless reports whether any keyless-login setting is set.
func (c *Config) wantsKeyless() bool {
	return c.ClientID != "" || c.IDToken != "" || c.IDTokenFile != ""
}

// keylessVars names the keyless-login variables that are set, for messages.
func (c *Config) keylessVars() string {
	var set []string
	for _, v := range []struct{ name, val string }{{"TS_CLIENT_ID", c.ClientID}, {"TS_ID_TOKEN", c.IDToken}, {"TS_ID_TOKEN_FILE", c.IDTokenFile}} {
		if v.val != "" {
			set = append(set, v.name)
		}
	}
	return strings.Join(set, ", ")
}

// validateKeyless checks the keyless-login settings against each other and
// the other ways to log in, and that the token file can be opened. It
// never reads the token, nor names its value.
func (c *Config) validateKeyless() []error {
	if !c.wantsKeyless() {
		return nil
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.AuthKey != "" {
		bad("TS_AUTHKEY and keyless login (%s) are both set: want one way to log in; for keyless login delete TS_AUTHKEY (e.g. from the tsrelay-auth Secret)", c.keylessVars())
	}
	if c.ClientSecret != "" {
		bad("TS_CLIENT_SECRET and keyless login (%s) are both set: want one way to log in, an OAuth client secret or a federated identity's client ID and token", c.keylessVars())
	}
	if c.ClientID == "" {
		bad("%s needs TS_CLIENT_ID: the client ID of the trusted credential (federated identity) in the Tailscale admin console", c.keylessVars())
	} else if _, _, err := keyless.ParseClientID(c.ClientID); err != nil {
		bad("TS_CLIENT_ID=%s: %v; want the credential's client ID, optionally followed by ?ephemeral=true|false&preauthorized=true|false", c.ClientID, err)
	}
	switch {
	case c.IDToken != "" && c.IDTokenFile != "":
		bad("TS_ID_TOKEN and TS_ID_TOKEN_FILE are both set: want one, the token or the path of the projected ServiceAccount token")
	case c.ClientID != "" && c.IDToken == "" && c.IDTokenFile == "":
		bad("TS_CLIENT_ID needs TS_ID_TOKEN_FILE: the path of the pod's projected ServiceAccount token (components/keyless sets it), or TS_ID_TOKEN with a token")
	}
	if len(c.AdvertiseTags) == 0 {
		bad("keyless login (%s) needs TS_ADVERTISE_TAGS: keys minted through workload identity federation must be tagged with the credential's tags (e.g. TS_ADVERTISE_TAGS=tag:relay)", c.keylessVars())
	}
	if c.IDTokenFile != "" {
		if err := checkReadable(c.IDTokenFile); err != nil {
			bad("TS_ID_TOKEN_FILE=%s: %v; want a readable file, the projected ServiceAccount token (a volume with a serviceAccountToken source)", c.IDTokenFile, err)
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

// keylessLogin returns the auth key for the node's first login through
// workload identity federation, or "" when keyless login is off or the
// node state already holds a node key: the token is read only when it is
// needed. While the control server refuses, it keeps trying with backoff,
// re-reading the token each time, and /readyz says why; it returns only
// with a key, or with ctx's error.
//
// With no state store given (TS_STATE_DIR), it opens the file store tsnet
// would, and hands it to tsnet, so that both see the same state.
func (a *appliance) keylessLogin(ctx context.Context) (string, error) {
	if a.cfg.ClientID == "" {
		return "", nil
	}
	if a.ts.Store == nil {
		s, err := store.New(a.ts.Logf, filepath.Join(a.cfg.StateDir, "tailscaled.state"))
		if err != nil {
			return "", fmt.Errorf("open node state in TS_STATE_DIR=%s: %w", a.cfg.StateDir, err)
		}
		a.ts.Store = s
	}
	has, err := hasNodeKey(a.ts.Store)
	if err != nil {
		return "", err
	}
	if has {
		a.logger.Info("keyless login not needed: the node state holds a node key")
		return "", nil
	}
	c := &keyless.Client{BaseURL: a.controlURL(), ClientID: a.cfg.ClientID, Tags: a.cfg.AdvertiseTags}
	wait := keylessRetryMin
	var last string
	for {
		claims, key, err := a.mintAuthKey(ctx, c)
		if err == nil {
			a.status.setKeyless("")
			a.logger.Info("keyless login: auth key minted through workload identity federation", "token", claims.String())
			a.events.Normal("KeylessLogin", "auth key minted through workload identity federation for "+claims.Subject)
			return key, nil
		}
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		msg := err.Error()
		a.status.setKeyless(msg)
		if msg != last {
			// A refusal repeats with every retry; log each one once.
			a.logger.Error("keyless login failed; retrying", "err", msg, "every", "up to "+keylessRetryMax.String())
			a.events.Warning("KeylessLoginFailed", msg)
			last = msg
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, keylessRetryMax)
	}
}

// mintAuthKey reads the token and trades it for an auth key. An error says
// which token was refused by its claims (issuer, subject, audience,
// expiry), which are not secret, never by the token itself.
func (a *appliance) mintAuthKey(ctx context.Context, c *keyless.Client) (keyless.Claims, string, error) {
	token, err := a.readIDToken()
	if err != nil {
		return keyless.Claims{}, "", err
	}
	claims, err := keyless.ParseClaims(token)
	if err != nil {
		return claims, "", fmt.Errorf("the ID token (%s) is %w", a.tokenSource(), err)
	}
	if slices.Contains(claims.Audience, keylessAudiencePlaceholder) {
		return claims, "", fmt.Errorf("the ID token's audience is components/keyless's placeholder %s: patch the projected volume's audience with the one the trusted credential shows in the admin console (README: Keyless login)", keylessAudiencePlaceholder)
	}
	key, err := c.AuthKey(ctx, token)
	if err != nil {
		return claims, "", fmt.Errorf("%w (token %s)", err, claims)
	}
	return claims, key, nil
}

// readIDToken returns TS_ID_TOKEN, or what TS_ID_TOKEN_FILE holds now: the
// kubelet rewrites a projected token before it expires.
func (a *appliance) readIDToken() (string, error) {
	if a.cfg.IDTokenFile == "" {
		return a.cfg.IDToken, nil
	}
	f, err := os.Open(a.cfg.IDTokenFile)
	if err != nil {
		return "", fmt.Errorf("read TS_ID_TOKEN_FILE: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxIDTokenBytes+1))
	if err != nil {
		return "", fmt.Errorf("read TS_ID_TOKEN_FILE: %w", err)
	}
	if len(b) > maxIDTokenBytes {
		return "", fmt.Errorf("TS_ID_TOKEN_FILE=%s is larger than %d bytes: not a token", a.cfg.IDTokenFile, maxIDTokenBytes)
	}
	return strings.TrimSpace(string(b)), nil
}

// tokenSource names where the token came from, for messages.
func (a *appliance) tokenSource() string {
	if a.cfg.IDTokenFile != "" {
		return "in TS_ID_TOKEN_FILE=" + a.cfg.IDTokenFile
	}
	return "in TS_ID_TOKEN"
}

// controlURL is the control server the node logs in to, tsnet's default
// when TS_CONTROL_URL is empty.
func (a *appliance) controlURL() string {
	if a.cfg.ControlURL != "" {
		return a.cfg.ControlURL
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
