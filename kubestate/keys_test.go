package kubestate

import (
	"errors"
	"regexp"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/validation"
	"tailscale.com/ipn"
)

func TestEncodeKey(t *testing.T) {
	tests := []struct {
		id   ipn.StateKey
		want string
	}{
		// Tailscale's keys stay readable.
		{"_machinekey", "_machinekey"},
		{"_current-profile", "_current-profile"},
		{"_profiles", "_profiles"},
		{"profile-1a2b", "profile-1a2b"},
		{"_routeInfo", "_routeInfo"},
		{"_debug_magicsock_until", "_debug_magicsock_until"},
		{"relay.tail1234.ts.net.crt", "relay.tail1234.ts.net.crt"},
		// Everything else is escaped as _XX.
		{"_serve/1a2b", "_serve_2F1a2b"},
		{"_current/user@example.com", "_current_2Fuser_40example.com"},
		{"a b", "a_20b"},
		{"é", "_C3_A9"},
		{"\x00", "_00"},
		// "_" is escaped only where it would read as an escape.
		{"_AB", "_5FAB"},
		{"_2F", "_5F2F"},
		{"_2f", "_2f"},
		{"_A", "_A"},
		{"__AB", "__5FAB"},
		// A leading "." is escaped: ".", ".." and "..x" are invalid keys.
		{".", "_2E"},
		{"..", "_2E."},
		{".x", "_2Ex"},
		{"x.", "x."},
	}
	for _, tt := range tests {
		got, err := encodeKey(tt.id)
		if err != nil || got != tt.want {
			t.Errorf("encodeKey(%q) = %q, %v; want %q, nil", tt.id, got, err, tt.want)
		}
	}
}

func TestDecodeKey(t *testing.T) {
	tests := []struct {
		s      string
		want   ipn.StateKey
		wantOK bool
	}{
		{"_machinekey", "_machinekey", true},
		{"_serve_2F1a2b", "_serve/1a2b", true},
		{"TS_AUTHKEY", "TS_AUTHKEY", true}, // "_AU" is no escape, so this is its own encoding
		{"a_c3", "a_c3", true},             // lower-case hex is no escape
		{"", "", false},
		{"a/b", "", false},    // not a Secret key
		{"x_2D", "", false},   // "-" is never escaped: "x-" is stored as "x-"
		{"_5Fab", "", false},  // "_" before "ab" is never escaped
		{".x", "", false},     // a leading "." is always escaped
		{"_2E_2E", "", false}, // a second "." is never escaped
	}
	for _, tt := range tests {
		got, ok := decodeKey(tt.s)
		if got != tt.want || ok != tt.wantOK {
			t.Errorf("decodeKey(%q) = %q, %v; want %q, %v", tt.s, got, ok, tt.want, tt.wantOK)
		}
	}
}

// secretKeyRE is the documented pattern for Secret data keys.
var secretKeyRE = regexp.MustCompile(`^[-._a-zA-Z0-9]+$`)

// FuzzKeyRoundTrip checks both directions of the key mapping:
//   - every state key that encodes, encodes to a valid Secret key that decodes
//     back to it; only keys that cannot fit fail;
//   - every string that decodes is the encoding of what it decodes to, so no
//     two Secret keys hold the same state key.
//
// The seeds run as a normal test under go test.
func FuzzKeyRoundTrip(f *testing.F) {
	for _, s := range []string{
		"", "_machinekey", "_current-profile", "_profiles", "profile-1a2b", "_routeInfo",
		"_serve/1a2b", "_current/user@example.com", "relay.tail1234.ts.net.crt",
		".", "..", "..x", ".x", "_", "__", "_A", "_AB", "_ABC", "_2F", "_2f", "x_2D", "_5Fab",
		"TS_AUTHKEY", "a b", "é", "\x00", "\xff\xfe", "ключ",
		strings.Repeat("a", maxKeyLen), strings.Repeat("a", maxKeyLen+1),
		strings.Repeat("/", maxPlainKeyLen), strings.Repeat("/", maxPlainKeyLen+1),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		enc, err := encodeKey(ipn.StateKey(s))
		switch {
		case s == "":
			if !errors.Is(err, errEmptyKey) {
				t.Fatalf("encodeKey(%q) error = %v, want %v", s, err, errEmptyKey)
			}
		case err != nil:
			if !errors.Is(err, errKeyTooLong) || len(s) <= maxPlainKeyLen {
				t.Fatalf("encodeKey(%q) error = %v; only keys over %d bytes may fail, with %v", s, err, maxPlainKeyLen, errKeyTooLong)
			}
		default:
			if !secretKeyRE.MatchString(enc) || len(enc) > maxKeyLen {
				t.Fatalf("encodeKey(%q) = %q, not a valid Secret key", s, enc)
			}
			if errs := validation.IsConfigMapKey(enc); len(errs) > 0 {
				t.Fatalf("encodeKey(%q) = %q, rejected by the API server's rules: %v", s, enc, errs)
			}
			if got, ok := decodeKey(enc); !ok || got != ipn.StateKey(s) {
				t.Fatalf("decodeKey(encodeKey(%q) = %q) = %q, %v; want %q, true", s, enc, got, ok, s)
			}
		}
		if len(s) > maxKeyLen && err == nil {
			t.Fatalf("encodeKey(%q) = %q, longer than %d", s, enc, maxKeyLen)
		}

		// s as a key found in a Secret.
		if id, ok := decodeKey(s); ok {
			if got, err := encodeKey(id); err != nil || got != s {
				t.Fatalf("encodeKey(decodeKey(%q) = %q) = %q, %v; want %q", s, id, got, err, s)
			}
		}
	})
}
