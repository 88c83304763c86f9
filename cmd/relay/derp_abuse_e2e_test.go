package main

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tsrelay/tsrelay/internal/httpserve"
	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// TestRelayPortLimits attacks the real relay binary's public ports with
// its DERP region on (issue 27): the DERP port answers an oversized header
// with 431, closes the oldest unadmitted connection when one more than
// TS_DERP_MAX_UNADMITTED arrives and counts it by reason; the health port closes a connection once its one
// request is answered, and at its cap closes the oldest connection without
// a whole header for a new one. derpregion's and httpserve's tests check each limit
// in depth; this one checks the binary applies them, settings included.
func TestRelayPortLimits(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	ports := freeDERPRelayPorts(t)
	derpAddr := ports.derpAddr
	const maxUnadmitted = 4
	relay := startRelay(t, bins, "relay", append(ports.env(),
		"TS_CONTROL_URL="+control.URL,
		"TS_AUTHKEY="+control.AuthKey,
		"TS_STATE_DIR="+t.TempDir(),
		"TS_HOSTNAME=relay",
		"TS_DERP_MAX_UNADMITTED="+strconv.Itoa(maxUnadmitted),
	)...)
	waitReady(t, relay)

	t.Run("health port: one request per connection", func(t *testing.T) {
		c, err := net.Dial("tcp", relay.HTTPAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		br := bufio.NewReader(c)
		io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: keep-alive\r\n\r\n")
		// Closed right after the answer; with keep-alives the connection
		// would stay for the idle (or read) timeout, 10 s or more.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("health port after one answer: read = %v, want EOF (closed by the relay)", err)
		}
	})

	t.Run("health port: held headers do not keep a probe out", func(t *testing.T) {
		// More unfinished headers than the cap, then a probe: it must be
		// answered before any held connection's header timeout could have
		// freed a slot (1.9 s behind 1,000 before, issue 27). Eviction and
		// timeouts both close the oldest first, so only that time tells
		// them apart; opening the connections takes about 0.1 s.
		n := httpserve.MaxConns + 64
		held := make([]net.Conn, 0, n)
		start := time.Now()
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for i := range n {
			c, err := net.Dial("tcp", relay.HTTPAddr)
			if err != nil {
				t.Fatalf("dial %d: %v", i, err)
			}
			held = append(held, c)
			if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Pad: aaaa"); err != nil {
				t.Fatalf("write %d: %v", i, err)
			}
		}
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + relay.HTTPAddr + "/healthz")
		if err != nil {
			t.Fatalf("/healthz behind %d unfinished headers: %v", n, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/healthz behind %d unfinished headers: %s", n, resp.Status)
		}
		if took := time.Since(start); took >= httpserve.ReadHeaderTimeout {
			t.Errorf("/healthz behind %d unfinished headers answered %.1f s after the first was opened, not before their %v header timeout: it waited for held connections to time out instead of evicting the oldest", n, took.Seconds(), httpserve.ReadHeaderTimeout)
		}
	})

	t.Run("DERP port: oversized header", func(t *testing.T) {
		c := tlsDial(t, netip.MustParseAddr("127.0.0.1"), derpAddr)
		go fmt.Fprintf(c, "GET /derp HTTP/1.1\r\nHost: derp\r\nUpgrade: DERP\r\nX-Pad: %s", strings.Repeat("a", 64<<10))
		// Before the relay's 5 s header timeout would end it silently.
		c.SetReadDeadline(time.Now().Add(4 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("64 KiB header: %v, want 431", err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("64 KiB header: %s, want 431", resp.Status)
		}
	})

	t.Run("DERP port: unadmitted cap", func(t *testing.T) {
		held := make([]net.Conn, maxUnadmitted)
		for i := range held {
			c, err := dialFrom(netip.AddrFrom4([4]byte{127, 0, 1, byte(i + 1)}), derpAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			held[i] = c
			err = tailnettest.WaitFor(t.Context(), 20*time.Millisecond, func() (bool, error) {
				v, _ := tailnettest.MetricSum(relayMetrics(t, relay), "tsrelay_derp_unadmitted_connections")
				return v == float64(i+1), nil
			})
			if err != nil {
				t.Fatalf("held connection %d never counted: %v", i+1, err)
			}
		}
		over, err := dialFrom(netip.AddrFrom4([4]byte{127, 0, 1, 100}), derpAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer over.Close()
		// The oldest is closed at once to make room; without the cap, it
		// would be held until the 5 s handshake timeout.
		held[0].SetReadDeadline(time.Now().Add(4 * time.Second))
		_, err = io.Copy(io.Discard, held[0])
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("oldest connection with TS_DERP_MAX_UNADMITTED=%d reached: still open, want closed at once", maxUnadmitted)
		}
		if v, _ := tailnettest.MetricSum(relayMetrics(t, relay), "tsrelay_derp_connections_refused_total", "reason", "unadmitted_cap"); v < 1 {
			t.Errorf("tsrelay_derp_connections_refused_total{reason=unadmitted_cap} = %v, want ≥ 1", v)
		}
	})
}

// dialFrom opens a TCP connection to addr from the loopback address src.
func dialFrom(src netip.Addr, addr string) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 10 * time.Second}
	return d.Dial("tcp", addr)
}

// tlsDial is dialFrom with a TLS handshake (the relay's self-signed
// certificate is not checked: the test is not a DERP client).
func tlsDial(t *testing.T, src netip.Addr, addr string) *tls.Conn {
	t.Helper()
	c, err := dialFrom(src, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	tc.SetDeadline(time.Time{})
	return tc
}
