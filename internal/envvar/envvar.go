// Package envvar reads settings from the environment: the one decoder that
// parsing, validation and --help share (Walk, Decode, Usage), which descends
// into embedded structs and reports every bad variable in one run, and the
// value types that more than one package's configuration uses (the relay's
// own and the DERP region's), so that each is parsed one way.
package envvar

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Port is a port number read from the environment; 0 when the variable is
// set but blank.
type Port uint16

// Decode implements envconfig.Decoder.
func (p *Port) Decode(s string) error {
	s = strings.TrimSpace(s)
	if s == "" {
		*p = 0 // set but empty, as manifests with a blank value do: unset
		return nil
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return errors.New("not a port number; want 0-65535")
	}
	if n > 65535 {
		return fmt.Errorf("port %d out of range; want 0-65535", n)
	}
	*p = Port(n)
	return nil
}

// Fields returns the comma-separated entries of a list setting, trimmed of
// white space, without empty ones (a trailing comma, a blank value).
func Fields(s string) []string {
	var out []string
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
