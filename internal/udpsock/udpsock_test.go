package udpsock

import (
	"errors"
	"net"
	"slices"
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

// TestReadTable reads the kernel's table format: only rows on the port
// whose inode the process holds, with their descriptors and drops.
func TestReadTable(t *testing.T) {
	table := `   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1111 2 0000000000000000 0
  101: 00000000:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2222 2 0000000000000000 5
  102: 0100007F:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3333 2 0000000000000000 17
  103: 00000000:9C41 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4444 2 0000000000000000 0
`
	fds := map[uint64]int{1111: 7, 3333: 9, 4444: 11}
	got, err := readTable(strings.NewReader(table), 40000, fds, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	// inode 2222 is another process's, 4444 on another port.
	want := []Socket{{FD: 7, Inode: 1111, IPv6: true}, {FD: 9, Inode: 3333, IPv6: true, Drops: 17}}
	if !slices.Equal(got, want) {
		t.Errorf("readTable(port 40000) = %+v, want %+v", got, want)
	}
	if _, err := readTable(strings.NewReader(strings.Replace(table, " 17\n", " x\n", 1)), 40000, fds, false, nil); err == nil {
		t.Error("readTable accepted a drops column that is not a number")
	}
}

// TestListRealSocket finds a real socket with its descriptor, and counts
// the datagrams the kernel dropped for it when its receive buffer was
// full.
func TestListRealSocket(t *testing.T) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetReadBuffer(1); err != nil { // the kernel's minimum
		t.Fatal(err)
	}
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	rc.Control(func(f uintptr) { fd = int(f) })
	port := c.LocalAddr().(*net.UDPAddr).Port

	w, err := net.DialUDP("udp4", nil, c.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	const sent = 100
	for range sent { // never read: all but the first few overflow the buffer
		if _, err := w.Write(make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	socks, err := List(0, port)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 1 || socks[0].FD != fd || socks[0].IPv6 {
		t.Fatalf("List(self, %d) = %+v, want one IPv4 socket with descriptor %d", port, socks, fd)
	}
	if d := socks[0].Drops; d == 0 || d >= sent {
		t.Errorf("drops = %d after %d datagrams into a full buffer, want some but not all", d, sent)
	}
	t.Logf("%d of %d datagrams dropped", socks[0].Drops, sent)
}
