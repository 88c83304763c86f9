//go:build !linux

package tailnettest

import (
	"context"
	"errors"
	"net"
)

// DialInNetns is only implemented on Linux.
func DialInNetns(ctx context.Context, netns, network, addr string) (net.Conn, error) {
	return nil, errors.New("network namespaces are Linux only")
}
