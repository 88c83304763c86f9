package main

import (
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
	"github.com/tsrelay/tsrelay/internal/udpsock"
)

// TestRelaySocketsFollowSetting runs the real relay binary with the default
// and with TS_RELAY_SERVER_SOCKETS set (and GOMAXPROCS set to something
// else, which the setting must override), and counts the UDP sockets each
// process has bound on its relay port, by IP family, in /proc. The count is
// what bounds the relay's memory (8 MiB of receive buffers per socket), so
// it must follow the setting, not the machine's cores; the log line and the
// metric must say the same.
func TestRelaySocketsFollowSetting(t *testing.T) {
	bins := binaries(t)
	control := tailnettest.StartControlForTest(t)
	ipv6 := canBindUDP6()
	for _, tt := range []struct {
		name string
		env  []string
		want int
	}{
		{"default", nil, 2},
		{"five", []string{"TS_RELAY_SERVER_SOCKETS=5", "GOMAXPROCS=1"}, 5},
		{"one", []string{"TS_RELAY_SERVER_SOCKETS=1", "GOMAXPROCS=16"}, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			port, err := tailnettest.FreeUDPPort()
			if err != nil {
				t.Fatal(err)
			}
			env := append([]string{
				"TS_CONTROL_URL=" + control.URL,
				"TS_STATE_DIR=" + t.TempDir(),
				"TS_HOSTNAME=relay-sockets-" + tt.name,
				"TS_RELAY_SERVER_PORT=" + strconv.Itoa(port),
				"TS_AUTHKEY=" + control.AuthKey,
			}, tt.env...)
			relay := startRelay(t, bins, "relay-sockets-"+tt.name, env...)
			waitReady(t, relay)

			got, err := udpsock.Count(relay.Pid(), port)
			if err != nil {
				t.Fatal(err)
			}
			want := udpsock.Counts{IPv4: tt.want}
			if ipv6 {
				want.IPv6 = tt.want
			}
			if got != want {
				t.Errorf("relay with %q bound %+v UDP sockets on port %d, want %+v", tt.env, got, port, want)
			}

			m := relayMetrics(t, relay)
			for fam, n := range map[string]int{"ipv4": want.IPv4, "ipv6": want.IPv6} {
				if v, ok := tailnettest.MetricSum(m, "tsrelay_relay_sockets", "family", fam); !ok || v != float64(n) {
					t.Errorf("tsrelay_relay_sockets{family=%q} = %v (exported: %v), want %d", fam, v, ok, n)
				}
			}
			if v, ok := tailnettest.MetricSum(m, "tsrelay_relay_sockets_setting"); !ok || v != float64(tt.want) {
				t.Errorf("tsrelay_relay_sockets_setting = %v (exported: %v), want %d", v, ok, tt.want)
			}
			wantLog := "runtime.socketsPerFamily=" + strconv.Itoa(tt.want)
			if log := relay.LogTail(200); !strings.Contains(log, wantLog) {
				t.Errorf("relay log has no %q:\n%s", wantLog, log)
			}
		})
	}
}

// canBindUDP6 reports whether this machine can bind an IPv6 UDP socket, as
// the relay server tries to (it goes on without IPv6 when it cannot).
func canBindUDP6() bool {
	c, err := net.ListenPacket("udp6", "[::]:0")
	if err != nil {
		return false
	}
	c.Close()
	return true
}
