package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"time"
)

// derpmapTimeout bounds `relay derpmap`: one request to the relay's own
// HTTP server in the same pod.
const derpmapTimeout = 10 * time.Second

// derpmapMain is `relay derpmap`: it prints the in-cluster DERP region's
// derpMap, fetched from the running relay's /derpmap, so that one
// `kubectl exec deploy/tsrelay -- /relay derpmap` gives what to paste into
// the tailnet policy file.
func derpmapMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("relay derpmap", flag.ContinueOnError)
	fs.SetOutput(stderr)
	format := fs.String("format", "json", "json: the value of the tailnet policy file's \"derpMap\"; headscale: a file for Headscale's derp.paths")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: relay derpmap [--format=json|headscale]\n\nPrints the derpMap of the running relay's DERP region (TS_DERP_PORT), from its HTTP server on TS_LOCAL_ADDR_PORT.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "relay derpmap: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	base, err := localHTTPBase(os.Getenv("TS_LOCAL_ADDR_PORT"))
	if err != nil {
		fmt.Fprintln(stderr, "relay derpmap:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, derpmapTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", base+"/derpmap?format="+url.QueryEscape(*format), nil)
	if err != nil {
		fmt.Fprintln(stderr, "relay derpmap:", err)
		return 1
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "relay derpmap: ask the relay at %s: %v\n", base, err)
		return 1
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	if err != nil {
		fmt.Fprintf(stderr, "relay derpmap: read the answer from %s: %v\n", base, err)
		return 1
	}
	switch {
	case res.StatusCode == http.StatusOK:
		stdout.Write(body)
		return 0
	case res.StatusCode == http.StatusNotFound:
		fmt.Fprintln(stderr, "relay derpmap: this relay serves no DERP region; set TS_DERP_PORT and TS_STUN_PORT (manifests/components/derp)")
	default:
		fmt.Fprintf(stderr, "relay derpmap: %s: %s", res.Status, body)
	}
	return 1
}

// localHTTPBase is the URL of the relay's HTTP server as seen from inside
// its pod: TS_LOCAL_ADDR_PORT (default [::]:9002), with a wildcard address
// replaced by loopback.
func localHTTPBase(addrPort string) (string, error) {
	if addrPort == "" {
		addrPort = "[::]:9002"
	}
	ap, err := netip.ParseAddrPort(addrPort)
	if err != nil {
		return "", fmt.Errorf("TS_LOCAL_ADDR_PORT=%s: want ip:port or [ipv6]:port", addrPort)
	}
	host := ap.Addr()
	if host.IsUnspecified() {
		host = netip.MustParseAddr("127.0.0.1")
	}
	return "http://" + net.JoinHostPort(host.String(), strconv.Itoa(int(ap.Port()))), nil
}
