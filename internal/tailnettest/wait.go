package tailnettest

import (
	"context"
	"fmt"
	"net"
	"time"
)

// WaitFor calls cond now and then every interval until it reports true, it
// returns an error, or ctx ends. It returns nil once cond is true, cond's
// error as is, or a wrapped context.Cause(ctx). Tests wait with WaitFor and a
// deadline, never with bare sleeps.
func WaitFor(ctx context.Context, interval time.Duration, cond func() (bool, error)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("condition not met: %w", context.Cause(ctx))
		case <-t.C:
		}
	}
}

// FreeUDPPort returns a UDP port that was free on 127.0.0.1 a moment ago.
// Another process can take it before the caller binds it; the window is
// small enough for tests.
func FreeUDPPort() (int, error) {
	pc, err := net.ListenPacket("udp4", net.JoinHostPort(loopback, "0"))
	if err != nil {
		return 0, fmt.Errorf("find free UDP port: %w", err)
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port, nil
}

// FreeTCPAddr returns "127.0.0.1:port" for a TCP port that was free a moment
// ago, e.g. for a process's HTTP listen address.
func FreeTCPAddr() (string, error) {
	ln, err := net.Listen("tcp4", net.JoinHostPort(loopback, "0"))
	if err != nil {
		return "", fmt.Errorf("find free TCP port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// FreeDualStackUDPPort returns a UDP port that was free a moment ago on
// both the IPv4 and the IPv6 wildcard address, for a relay that binds it in
// both families. It fails if this machine cannot bind an IPv6 UDP socket.
func FreeDualStackUDPPort() (int, error) {
	var lastErr error
	for range 20 {
		pc4, err := net.ListenPacket("udp4", "0.0.0.0:0")
		if err != nil {
			return 0, fmt.Errorf("find free dual-stack UDP port: %w", err)
		}
		port := pc4.LocalAddr().(*net.UDPAddr).Port
		pc6, err := net.ListenPacket("udp6", net.JoinHostPort("::", fmt.Sprint(port)))
		pc4.Close()
		if err == nil {
			pc6.Close()
			return port, nil
		}
		lastErr = err
	}
	return 0, fmt.Errorf("find free dual-stack UDP port: no port free in both families: %w", lastErr)
}
