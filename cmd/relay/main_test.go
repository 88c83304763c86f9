package main

import (
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
