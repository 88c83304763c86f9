package envvar

import (
	"fmt"
	"slices"
	"testing"
)

func TestPortDecode(t *testing.T) {
	for _, tc := range []struct {
		in, want string // the port, or the error
	}{
		{"", "0"},
		{" 8443 ", "8443"},
		{"0", "0"},
		{"65535", "65535"},
		{"65536", "port 65536 out of range; want 0-65535"},
		{"abc", "not a port number; want 0-65535"},
		{"-1", "not a port number; want 0-65535"},
	} {
		p := Port(7)
		var got string
		if err := p.Decode(tc.in); err != nil {
			got = err.Error()
		} else {
			got = fmt.Sprint(uint16(p))
		}
		if got != tc.want {
			t.Errorf("Port.Decode(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

func TestFields(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{" , ,", nil},
		{"a", []string{"a"}},
		{" a , b,,c ,", []string{"a", "b", "c"}},
	} {
		if got := Fields(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("Fields(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
