package kubestate

import (
	"errors"
	"fmt"
	"strings"

	"tailscale.com/ipn"
)

// Secret data keys must match [-._a-zA-Z0-9]+, be at most 253 characters
// long and must not be ".", ".." or start with "..": the rules of
// validation.IsConfigMapKey in k8s.io/apimachinery v0.37.2, which the API
// server applies to Secret keys.
const maxKeyLen = 253

// maxPlainKeyLen is the longest state key that always fits: escaping
// triples a byte at most, and 3*84 = 252 <= maxKeyLen.
const maxPlainKeyLen = maxKeyLen / 3

const upperHex = "0123456789ABCDEF"

var (
	errEmptyKey   = errors.New("empty state key")
	errKeyTooLong = errors.New("state key too long for a Secret")
)

// encodeKey maps a state key to a Secret data key, reversibly.
//
// Bytes outside [-._a-zA-Z0-9] become "_XX" (XX: upper-case hex). Everything
// else stays as it is, so Tailscale's usual keys (_machinekey,
// _current-profile, _profiles, profile-1a2b, host.ts.net.crt) are stored under
// their own names, and a Secret written by Tailscale's kubestore (which stores
// those keys unchanged too) reads the same here. Two cases of safe bytes are
// escaped as well, to keep the mapping reversible and the result valid:
//   - "_" when the next two bytes are upper-case hex digits, since "_2F"
//     would otherwise read back as "/";
//   - "." as the first byte, since ".", ".." and "..x" are not valid keys.
func encodeKey(k ipn.StateKey) (string, error) {
	if k == "" {
		return "", errEmptyKey
	}
	s := string(k)
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if needsEscape(s, i) {
			b.WriteByte('_')
			b.WriteByte(upperHex[c>>4])
			b.WriteByte(upperHex[c&0x0f])
			continue
		}
		b.WriteByte(c)
	}
	if b.Len() > maxKeyLen {
		return "", fmt.Errorf("%w: %q encodes to %d characters, the limit is %d", errKeyTooLong, s, b.Len(), maxKeyLen)
	}
	return b.String(), nil
}

// needsEscape reports whether encodeKey escapes s[i].
func needsEscape(s string, i int) bool {
	c := s[i]
	switch {
	case !isKeyChar(c):
		return true
	case c == '.':
		return i == 0
	case c == '_':
		// Hex digits and upper-case letters are never escaped themselves, so
		// they appear unchanged right after this "_" in the output.
		return i+2 < len(s) && isUpperHex(s[i+1]) && isUpperHex(s[i+2])
	}
	return false
}

// decodeKey reverses encodeKey. It accepts only the exact form encodeKey
// produces, so every state key has exactly one Secret key: "x_2D" is not read
// as "x-" (encodeKey writes "x-"), since a write to "x-" would then leave the
// stale "x_2D" behind. Secret keys that do not decode belong to someone else.
func decodeKey(s string) (ipn.StateKey, bool) {
	if s == "" || len(s) > maxKeyLen {
		return "", false
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !isKeyChar(c) {
			return "", false
		}
		if c == '_' && i+2 < len(s) && isUpperHex(s[i+1]) && isUpperHex(s[i+2]) {
			b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
			i += 2
			continue
		}
		b = append(b, c)
	}
	k := ipn.StateKey(b)
	if enc, err := encodeKey(k); err != nil || enc != s {
		return "", false
	}
	return k, true
}

// isKeyChar reports whether c may appear in a Secret data key.
func isKeyChar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_'
}

func isUpperHex(c byte) bool {
	return '0' <= c && c <= '9' || 'A' <= c && c <= 'F'
}

// unhex returns the value of an upper-case hex digit.
func unhex(c byte) byte {
	if c <= '9' {
		return c - '0'
	}
	return c - 'A' + 10
}
