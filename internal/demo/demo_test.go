package main

import (
	"bytes"
	"context"
	"regexp"
	"testing"
	"time"
)

// TestDemo runs make demo's program as a newcomer would and checks what it
// shows: pongs that moved onto the relay at the port the relay was given,
// and relay check finding the path relayed there. The relay offers its
// interface addresses beside the static endpoint, so the laptops may use
// any of them: only the port is the relay's for sure.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the relay, two tailscaleds and a tailnet")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	var out bytes.Buffer
	if err := run(ctx, &out); err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out.String())
	}
	m := regexp.MustCompile(`TS_RELAY_SERVER_PORT=(\d+)`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("the demo did not show the relay's port:\n%s", out.String())
	}
	port := regexp.QuoteMeta(m[1])
	for _, want := range []string{
		`pong from laptop-b \S+ via peer-relay\(\S+:` + port + `:vni:\d+\)`,
		`laptop-b \S+: OK via peer-relay \S+:` + port + ` vni \d+`,
	} {
		if !regexp.MustCompile(want).MatchString(out.String()) {
			t.Errorf("demo output has no line matching %q:\n%s", want, out.String())
		}
	}
}
