package tailnettest

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

const testDelay = 20 * time.Millisecond

// TestDelayTCP checks that a round trip through the proxy costs at least
// twice its delay and that bytes arrive intact and in order.
func TestDelayTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c) // echo
	}()
	p, err := StartDelayTCP("127.0.0.1:0", ln.Addr().(*net.TCPAddr).AddrPort(), testDelay)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, err := net.Dial("tcp", p.Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := bytes.Repeat([]byte("0123456789"), 1000)
	start := time.Now()
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if rtt := time.Since(start); rtt < 2*testDelay {
		t.Errorf("round trip through the proxy = %v, want at least %v", rtt, 2*testDelay)
	}
	if !bytes.Equal(got, msg) {
		t.Errorf("echo through the proxy differs from what was sent")
	}
}

// TestDelayUDP checks the same for datagrams, replies coming back from the
// proxy's address.
func TestDelayUDP(t *testing.T) {
	echo, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := echo.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			echo.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	p, err := StartDelayUDP("127.0.0.1:0", echo.LocalAddr().(*net.UDPAddr).AddrPort(), testDelay)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	if _, err := c.WriteToUDPAddrPort([]byte("ping"), p.Addr); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatal(err)
	}
	if rtt := time.Since(start); rtt < 2*testDelay {
		t.Errorf("round trip through the proxy = %v, want at least %v", rtt, 2*testDelay)
	}
	if string(buf[:n]) != "ping" || from != p.Addr {
		t.Errorf("reply %q from %v, want \"ping\" from %v", buf[:n], from, p.Addr)
	}
}
