package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestRunExitCodes(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		env        map[string]string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{"help", []string{"--help"}, nil, 0, "TS_RELAY_SERVER_STATIC_ENDPOINTS", ""},
		{"version", []string{"--version"}, nil, 0, "tsrelay ", ""},
		{"unknown argument", []string{"up"}, nil, 2, "", `unknown argument "up"`},
		{
			// The port a real deployment shipped with; nothing may be contacted.
			name:       "bad endpoint port",
			env:        map[string]string{"TS_RELAY_SERVER_PORT": "61441", "TS_RELAY_SERVER_STATIC_ENDPOINTS": "[fdc9:b01a:9d26:0:2::3]:81441"},
			wantCode:   2,
			wantStderr: "relay: TS_RELAY_SERVER_STATIC_ENDPOINTS=[fdc9:b01a:9d26:0:2::3]:81441: port 81441 out of range",
		},
		{"missing port", nil, map[string]string{"TS_RELAY_SERVER_PORT": ""}, 2, "", "relay: TS_RELAY_SERVER_PORT is required"},
		{
			name:       "no unadmitted DERP connections",
			env:        map[string]string{"TS_RELAY_SERVER_PORT": "61441", "TS_DERP_PORT": "8443", "TS_STUN_PORT": "3478", "TS_DERP_MAX_UNADMITTED": "0"},
			wantCode:   2,
			wantStderr: "relay: TS_DERP_MAX_UNADMITTED=0: want a number of connections from 1 to 100000",
		},
		{
			name:       "DERP accept rate not a number",
			env:        map[string]string{"TS_RELAY_SERVER_PORT": "61441", "TS_DERP_PORT": "8443", "TS_STUN_PORT": "3478", "TS_DERP_ACCEPT_RATE": "fast"},
			wantCode:   2,
			wantStderr: "TS_DERP_ACCEPT_RATE=fast",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			var stdout, stderr strings.Builder
			code := run(tt.args, &stdout, &stderr)
			if code != tt.wantCode {
				t.Errorf("run(%q) = %d, want %d\nstderr: %s", tt.args, code, tt.wantCode, stderr.String())
			}
			if !strings.Contains(stdout.String(), tt.wantStdout) {
				t.Errorf("run(%q) stdout = %q, want it to contain %q", tt.args, stdout.String(), tt.wantStdout)
			}
			if !strings.Contains(stderr.String(), tt.wantStderr) {
				t.Errorf("run(%q) stderr = %q, want it to contain %q", tt.args, stderr.String(), tt.wantStderr)
			}
		})
	}
}

// TestRunListsEveryConfigProblem checks that one run with several bad
// variables exits 2 and names each of them, one line each, before
// contacting anything.
func TestRunListsEveryConfigProblem(t *testing.T) {
	eps := make([]string, 17)
	for i := range eps {
		eps[i] = fmt.Sprintf("192.0.2.%d:61441", i+1)
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{
		"TS_RELAY_SERVER_PORT":             "udp",
		"TS_LOG_LEVEL":                     "loud",
		"TS_ADVERTISE_TAGS":                "relay",
		"TS_RELAY_SERVER_STATIC_ENDPOINTS": strings.Join(eps, ","),
		"TS_STATE_DIR":                     file + "/state",
		"TS_KUBE_SECRET":                   "",
		"KUBERNETES_SERVICE_HOST":          "",
	} {
		t.Setenv(k, v)
	}
	var stdout, stderr strings.Builder
	if code := run(nil, &stdout, &stderr); code != 2 {
		t.Fatalf("run = %d, want 2\nstderr: %s", code, stderr.String())
	}
	want := []string{
		"relay: TS_ADVERTISE_TAGS=relay: ",
		"relay: TS_RELAY_SERVER_PORT=udp: not a port number",
		"relay: TS_LOG_LEVEL=loud: unknown log level",
		"relay: TS_RELAY_SERVER_STATIC_ENDPOINTS: 17 distinct endpoints",
		"relay: TS_STATE_DIR=" + file + "/state: " + file + " is not a directory",
		"relay: see `relay --help` for every setting",
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	for _, w := range want {
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, w) }) {
			t.Errorf("stderr has no line starting %q:\n%s", w, stderr.String())
		}
	}
	if len(lines) != len(want) {
		t.Errorf("stderr has %d lines, want %d:\n%s", len(lines), len(want), stderr.String())
	}
}
