package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestDERPMapCommand runs `relay derpmap` against an HTTP server standing
// in for the relay's: it prints the body, passes the format, and explains
// a relay without a DERP region.
func TestDERPMapCommand(t *testing.T) {
	served := true
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/derpmap" || !served {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte("format=" + r.URL.Query().Get("format") + "\n"))
	}))
	defer srv.Close()
	t.Setenv("TS_LOCAL_ADDR_PORT", strings.TrimPrefix(srv.URL, "http://"))

	for _, tc := range []struct {
		args     []string
		served   bool
		code     int
		out, err string
	}{
		{[]string{"derpmap"}, true, 0, "format=json\n", ""},
		{[]string{"derpmap", "--format=headscale"}, true, 0, "format=headscale\n", ""},
		{[]string{"derpmap"}, false, 1, "", "serves no DERP region; set TS_DERP_PORT"},
		{[]string{"derpmap", "extra"}, true, 2, "", `unexpected argument "extra"`},
	} {
		served = tc.served
		var stdout, stderr bytes.Buffer
		code := run(tc.args, &stdout, &stderr)
		if code != tc.code || stdout.String() != tc.out || !strings.Contains(stderr.String(), tc.err) {
			t.Errorf("relay %v = %d, stdout %q, stderr %q; want %d, %q, %q", tc.args, code, stdout.String(), stderr.String(), tc.code, tc.out, tc.err)
		}
	}
}

func TestLocalHTTPBase(t *testing.T) {
	for in, want := range map[string]string{
		"":                 "http://127.0.0.1:9002",
		"[::]:9002":        "http://127.0.0.1:9002",
		"0.0.0.0:8080":     "http://127.0.0.1:8080",
		"10.0.0.5:9002":    "http://10.0.0.5:9002",
		"[fd00::5]:9002":   "http://[fd00::5]:9002",
		"not an addr:port": "TS_LOCAL_ADDR_PORT=not an addr:port: want ip:port",
	} {
		got, err := localHTTPBase(in)
		if err != nil {
			got = err.Error()
		}
		if !strings.HasPrefix(got, want) {
			t.Errorf("localHTTPBase(%q) = %q, want %q", in, got, want)
		}
	}
}
