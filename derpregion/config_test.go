package derpregion

import (
	"net/netip"
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	host := Host{RelayPort: 40000, WireGuardPort: 41641, HTTPAddr: netip.MustParseAddrPort("[::]:9002")}
	on := Config{DERPPort: 8443, STUNPort: 3478, RegionID: 900, RegionCode: "tsrelay", MaxUnadmitted: 256, AcceptRate: 100}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want []string // substrings of the error; none means valid
	}{
		{"off", func(d *Config) { *d = Config{RegionID: 900, RegionCode: "tsrelay"} }, nil},
		{"on, self-signed", func(*Config) {}, nil},
		{"on, user cert", func(d *Config) {
			d.CertFile, d.KeyFile, d.HostName = "/tls/tls.crt", "/tls/tls.key", "derp.example.com"
		}, nil},
		{"explicit addresses", func(d *Config) { d.Addrs = IPList{netip.MustParseAddr("192.0.2.10")} }, nil},
		{"STUN without DERP", func(d *Config) { d.DERPPort = 0 }, []string{"TS_STUN_PORT=3478 is set without TS_DERP_PORT"}},
		{"DERP without STUN", func(d *Config) { d.STUNPort = 0 }, []string{"TS_DERP_PORT=8443 needs TS_STUN_PORT"}},
		{"STUN on the relay port", func(d *Config) { d.STUNPort = 40000 }, []string{"TS_STUN_PORT=40000: must differ from TS_RELAY_SERVER_PORT"}},
		{"STUN on the WireGuard port", func(d *Config) { d.STUNPort = 41641 }, []string{"TS_STUN_PORT=41641"}},
		{"DERP on the HTTP port", func(d *Config) { d.DERPPort = 9002 }, []string{"TS_DERP_PORT=9002: must differ from the port of TS_LOCAL_ADDR_PORT"}},
		{"region ID", func(d *Config) { d.RegionID = 1 }, []string{"TS_DERP_REGION_ID=1: want a region ID from 900 to 999"}},
		{"region code", func(d *Config) { d.RegionCode = "My Region" }, []string{`TS_DERP_REGION_CODE="My Region"`}},
		{"cert without key", func(d *Config) { d.CertFile, d.HostName = "/tls/tls.crt", "derp.example.com" }, []string{"TS_DERP_CERT_FILE and TS_DERP_KEY_FILE go together"}},
		{"cert without host name", func(d *Config) { d.CertFile, d.KeyFile = "/tls/tls.crt", "/tls/tls.key" }, []string{"TS_DERP_CERT_FILE needs TS_DERP_HOSTNAME"}},
		{"host name without cert", func(d *Config) { d.HostName = "derp.example.com" }, []string{"TS_DERP_HOSTNAME=derp.example.com is set without TS_DERP_CERT_FILE"}},
		{"no unadmitted connections", func(d *Config) { d.MaxUnadmitted = 0 }, []string{"TS_DERP_MAX_UNADMITTED=0: want a number of connections from 1 to 100000"}},
		{"accept rate zero", func(d *Config) { d.AcceptRate = 0 }, []string{"TS_DERP_ACCEPT_RATE=0: want connections per second from 0.1"}},
		{"accept rate negative", func(d *Config) { d.AcceptRate = -5 }, []string{"TS_DERP_ACCEPT_RATE=-5"}},
		{"settings while off", func(d *Config) { d.DERPPort, d.STUNPort, d.CertFile = 0, 0, "/tls/tls.crt" }, []string{"is set but TS_DERP_PORT is not"}},
		{"every mistake at once", func(d *Config) { d.STUNPort, d.RegionID, d.RegionCode = 0, 5, "" }, []string{"needs TS_STUN_PORT", "TS_DERP_REGION_ID=5", "TS_DERP_REGION_CODE"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := on
			tc.edit(&d)
			err := d.Validate(host)
			if len(tc.want) == 0 {
				if err != nil {
					t.Errorf("Validate(%+v) = %v, want nil", d, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate(%+v) = nil, want errors containing %q", d, tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate(%+v) = %v, want it to contain %q", d, err, w)
				}
			}
		})
	}
}

func TestIPListDecode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // the list, or the error's start
	}{
		{"", ""},
		{"192.0.2.10", "192.0.2.10"},
		{" 192.0.2.10 , 2001:db8::1,192.0.2.10", "192.0.2.10,2001:db8::1"},
		{"::ffff:192.0.2.10", "192.0.2.10"},
		{"192.0.2.10:8443", `"192.0.2.10:8443" is not a unicast IP address`},
		{"[2001:db8::1]", `"[2001:db8::1]" is not`},
		{"0.0.0.0", `"0.0.0.0" is not`},
		{"derp.example.com", `"derp.example.com" is not`},
	} {
		var l IPList
		err := l.Decode(tc.in)
		var got string
		if err != nil {
			got = err.Error()
		} else {
			s := make([]string, len(l))
			for i, a := range l {
				s[i] = a.String()
			}
			got = strings.Join(s, ",")
		}
		if !strings.HasPrefix(got, tc.want) || (err == nil && got != tc.want) {
			t.Errorf("IPList.Decode(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
