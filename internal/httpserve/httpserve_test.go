package httpserve

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestAbuse holds many connections that each send an unfinished header,
// some under MaxHeaderBytes and held open, some of 1 MB, and checks that
// /healthz keeps answering at once and that the process's memory stays
// bounded (issue 17: 200 such connections OOM-killed a relay at 256 MiB).
func TestAbuse(t *testing.T) {
	const (
		held      = 600 // connections holding an unfinished header
		oversized = 200 // connections sending 1 MB of header
		budget    = 32 << 20
	)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, mux, nil) }()
	addr := ln.Addr().String()

	healthz := func(what string) {
		t.Helper()
		start := time.Now()
		c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Get("http://" + addr + "/healthz")
		if err != nil {
			t.Fatalf("/healthz %s: %v", what, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/healthz %s: %s", what, resp.Status)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("/healthz %s took %v, want under the kubelet's 1 s probe timeout", what, d)
		}
	}
	healthz("before")
	base := rss(t)

	// Held: a header just under the limit, never finished.
	pad := strings.Repeat("a", MaxHeaderBytes-200)
	conns := make([]net.Conn, 0, held)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := range held {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conns = append(conns, c)
		if _, err := fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: %s", pad); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	healthz(fmt.Sprintf("with %d unfinished headers held", held))

	// Oversized: 1 MB of header each, all at once; the server must
	// refuse them (431) rather than buffer them.
	big := bytes.Repeat([]byte("b"), 1<<20)
	var wg sync.WaitGroup
	statuses := make(chan string, oversized)
	for range oversized {
		wg.Go(func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				statuses <- "dial: " + err.Error()
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			go func() {
				fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
				c.Write(big) // fails once the server has answered and closed
			}()
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				statuses <- "read: " + err.Error()
				return
			}
			resp.Body.Close()
			statuses <- strconv.Itoa(resp.StatusCode)
		})
	}
	healthz(fmt.Sprintf("while %d connections send 1 MB headers", oversized))
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != "431" {
			t.Errorf("oversized header: got %s, want 431", s)
			break
		}
	}
	healthz("after")
	peak := rss(t) - base
	t.Logf("extra RSS with %d held and %d oversized connections: %.1f MiB", held, oversized, float64(peak)/(1<<20))
	if peak > budget {
		t.Errorf("extra RSS %d MiB, want under %d MiB", peak>>20, budget>>20)
	}

	cancel()
	if err := <-served; err != context.Canceled {
		t.Errorf("Serve after cancel = %v, want context.Canceled", err)
	}
}

// rss returns the process's resident set size: client and server side both,
// so it over-states the server's share.
func rss(t *testing.T) int {
	t.Helper()
	runtime.GC()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc/self/status: %v", err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				t.Fatalf("VmRSS %q: %v", v, err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}
