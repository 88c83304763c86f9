package udpsock

import (
	"errors"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// reusePort is a ListenConfig that sets SO_REUSEPORT, as Tailscale's relay
// server does, so several sockets can share one port.
var reusePort = net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	})
	return errors.Join(err, serr)
}}

// TestCountRealSockets binds real sockets and checks that Count sees
// exactly those on the port, by family, and stops seeing them once closed.
func TestCountRealSockets(t *testing.T) {
	first, err := reusePort.ListenPacket(t.Context(), "udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	port := first.LocalAddr().(*net.UDPAddr).Port
	portStr := strconv.Itoa(port)
	var conns []net.PacketConn
	listen := func(network, addr string) {
		t.Helper()
		c, err := reusePort.ListenPacket(t.Context(), network, addr)
		if err != nil {
			t.Fatalf("listen %s %s: %v", network, addr, err)
		}
		conns = append(conns, c)
	}
	for range 2 {
		listen("udp4", net.JoinHostPort("0.0.0.0", portStr))
	}
	want := Counts{IPv4: 3}
	if c6, err := reusePort.ListenPacket(t.Context(), "udp6", net.JoinHostPort("::", portStr)); err == nil {
		conns = append(conns, c6)
		listen("udp6", net.JoinHostPort("::", portStr))
		want.IPv6 = 2
	} else {
		t.Logf("no IPv6 here (%v): counting IPv4 only", err)
	}
	// A socket of this process on another port is not counted.
	other, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	got, err := Count(0, port)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("Count(self, %d) = %+v, want %+v", port, got, want)
	}
	for _, c := range conns {
		c.Close()
	}
	got, err = Count(0, port)
	if err != nil {
		t.Fatal(err)
	}
	if want := (Counts{IPv4: 1}); got != want {
		t.Errorf("after closing all but one: Count(self, %d) = %+v, want %+v", port, got, want)
	}
}

// TestCountTable reads the kernel's table format: only rows on the port
// whose inode the process holds.
func TestCountTable(t *testing.T) {
	table := `   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1111 2 0000000000000000 0
  101: 00000000:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2222 2 0000000000000000 0
  102: 0100007F:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3333 2 0000000000000000 0
  103: 00000000:9C41 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4444 2 0000000000000000 0
`
	inodes := map[string]bool{"1111": true, "3333": true, "4444": true}
	got, err := countTable(strings.NewReader(table), 40000, inodes)
	if err != nil {
		t.Fatal(err)
	}
	if got != 2 {
		t.Errorf("countTable(port 40000) = %d, want 2 (inode 2222 is another process's, 4444 another port)", got)
	}
}
