//go:build !linux

package pathmtu

import (
	"context"
	"errors"
	"net/netip"
)

// lookup needs Linux's netlink; the relay runs in Linux pods.
func lookup(context.Context, netip.Addr) (Path, bool, error) {
	return Path{}, false, errors.ErrUnsupported
}
