package relay

import (
	"strings"
	"testing"
)

// meshEnv is a valid outside-cluster mesh configuration of the relay at
// 192.0.2.10, with extra settings on top.
func meshEnv(extra map[string]string) map[string]string {
	env := map[string]string{
		"TS_RELAY_SERVER_PORT":             "40000",
		"TS_RELAY_SERVER_STATIC_ENDPOINTS": "192.0.2.10:40000",
		"TS_DERP_PORT":                     "8443",
		"TS_STUN_PORT":                     "3478",
		"TS_DERP_MESH_FILE":                "/tmp/mesh.json",
		"TS_DERP_MESH_PEERS":               "192.0.2.10:8443, 192.0.2.11:8443",
	}
	for k, v := range extra {
		if v == "" {
			delete(env, k)
		} else {
			env[k] = v
		}
	}
	return env
}

// TestLoadConfigMesh loads valid mesh settings from the environment;
// which member each makes this relay is derpregion's TestPlanMeshSelf.
func TestLoadConfigMesh(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
	}{
		{"by static endpoint IP", meshEnv(nil)},
		{"second member", meshEnv(map[string]string{"TS_RELAY_SERVER_STATIC_ENDPOINTS": "192.0.2.11:40000"})},
		{"by TS_DERP_ADDRS over static endpoints", meshEnv(map[string]string{"TS_DERP_ADDRS": "192.0.2.11"})},
		{"shared IP, by TS_DERP_PORT", meshEnv(map[string]string{
			"TS_RELAY_SERVER_STATIC_ENDPOINTS": "127.0.0.1:40000", "TS_DERP_PORT": "8444",
			"TS_DERP_MESH_PEERS": "127.0.0.1:8443,127.0.0.1:8444",
		})},
		{"forwarded port differs from TS_DERP_PORT", meshEnv(map[string]string{"TS_DERP_MESH_PEERS": "192.0.2.10:18443,192.0.2.11:18443"})},
		{"in a cluster, by TS_RELAY_SERVICE", meshEnv(map[string]string{
			"TS_KUBE_SECRET": "tsrelay-state", "TS_RELAY_SERVICE": "tsrelay-1", "TS_DERP_MESH_FILE": "",
			"TS_DERP_MESH_SECRET": "tsrelay-derp-mesh", "TS_DERP_MESH_PEERS": "tsrelay-0,tsrelay-1",
		})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			setEnv(t, tt.env)
			c, err := LoadConfig()
			if err != nil {
				t.Fatalf("LoadConfig: %v", err)
			}
			if len(c.MeshPeers) != 2 || !c.Enabled() {
				t.Errorf("LoadConfig: DERP region on %v with mesh peers %q, want on with 2", c.Enabled(), c.MeshPeers)
			}
		})
	}
}

func TestLoadConfigMeshErrors(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want []string
	}{
		{"no DERP port", meshEnv(map[string]string{"TS_DERP_PORT": "", "TS_STUN_PORT": ""}),
			[]string{"TS_DERP_MESH_SECRET, TS_DERP_MESH_FILE or TS_DERP_MESH_PEERS is set but TS_DERP_PORT is not"}},
		{"secret outside a cluster", meshEnv(map[string]string{"TS_DERP_MESH_FILE": "", "TS_DERP_MESH_SECRET": "tsrelay-derp-mesh"}),
			[]string{"TS_DERP_MESH_SECRET=tsrelay-derp-mesh needs TS_KUBE_SECRET", "TS_DERP_MESH_FILE=<path>"}},
		{"file in a cluster", meshEnv(map[string]string{"TS_KUBE_SECRET": "tsrelay-state", "TS_DERP_MESH_PEERS": "tsrelay-0,tsrelay-1", "TS_RELAY_SERVICE": "tsrelay-0"}),
			[]string{"TS_DERP_MESH_FILE=/tmp/mesh.json is for relays outside a cluster", "TS_DERP_MESH_SECRET=<Secret name>"}},
		{"both secret and file", meshEnv(map[string]string{"TS_DERP_MESH_SECRET": "tsrelay-derp-mesh"}),
			[]string{"TS_DERP_MESH_SECRET and TS_DERP_MESH_FILE are both set"}},
		{"peers without shared state", meshEnv(map[string]string{"TS_DERP_MESH_FILE": ""}),
			[]string{"TS_DERP_MESH_PEERS needs the region's shared state"}},
		{"file without peers", meshEnv(map[string]string{"TS_DERP_MESH_PEERS": ""}),
			[]string{"TS_DERP_MESH_SECRET or TS_DERP_MESH_FILE needs TS_DERP_MESH_PEERS"}},
		{"entry not ip:port", meshEnv(map[string]string{"TS_DERP_MESH_PEERS": "192.0.2.10:8443,tsrelay-1"}),
			[]string{`TS_DERP_MESH_PEERS: "tsrelay-1": want ip:port or [ipv6]:port`}},
		{"entry without port", meshEnv(map[string]string{"TS_DERP_MESH_PEERS": "192.0.2.10:8443,192.0.2.11"}),
			[]string{`"192.0.2.11": want ip:port`}},
		{"entry not a Service name in a cluster", meshEnv(map[string]string{
			"TS_KUBE_SECRET": "tsrelay-state", "TS_DERP_MESH_FILE": "", "TS_DERP_MESH_SECRET": "tsrelay-derp-mesh",
			"TS_RELAY_SERVICE": "tsrelay-0", "TS_DERP_MESH_PEERS": "tsrelay-0,10.0.0.1:8443",
		}), []string{`"10.0.0.1:8443" is not a Service name`}},
		{"duplicate", meshEnv(map[string]string{"TS_DERP_MESH_PEERS": "192.0.2.10:8443,192.0.2.11:8443,[::ffff:192.0.2.11]:8443"}),
			[]string{"is listed twice"}},
		{"one member", meshEnv(map[string]string{"TS_DERP_MESH_PEERS": "192.0.2.10:8443"}),
			[]string{"a mesh needs at least 2 members"}},
		{"with a certificate file", meshEnv(map[string]string{"TS_DERP_CERT_FILE": "/c.pem", "TS_DERP_KEY_FILE": "/k.pem", "TS_DERP_HOSTNAME": "derp.example.com"}),
			[]string{"TS_DERP_CERT_FILE cannot be used with a DERP mesh"}},
		{"self not listed", meshEnv(map[string]string{"TS_RELAY_SERVER_STATIC_ENDPOINTS": "192.0.2.99:40000"}),
			[]string{"no entry has one of this relay's IPs (192.0.2.99"}},
		{"no own address", meshEnv(map[string]string{"TS_RELAY_SERVER_STATIC_ENDPOINTS": ""}),
			[]string{"cannot tell which member is this relay: set TS_DERP_ADDRS or TS_RELAY_SERVER_STATIC_ENDPOINTS"}},
		{"shared IP, no port matches", meshEnv(map[string]string{"TS_DERP_MESH_PEERS": "192.0.2.10:18443,192.0.2.10:18444"}),
			[]string{"several entries have this relay's IP (192.0.2.10) and none has its TS_DERP_PORT=8443"}},
		{"self not listed in a cluster", meshEnv(map[string]string{
			"TS_KUBE_SECRET": "tsrelay-state", "TS_DERP_MESH_FILE": "", "TS_DERP_MESH_SECRET": "tsrelay-derp-mesh",
			"TS_RELAY_SERVICE": "tsrelay", "TS_DERP_MESH_PEERS": "tsrelay-0,tsrelay-1",
		}), []string{`does not include this relay's TS_RELAY_SERVICE="tsrelay"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			setEnv(t, tt.env)
			_, err := LoadConfig()
			if err == nil {
				t.Fatalf("LoadConfig() = nil error, want one mentioning %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("LoadConfig() error = %q, want it to contain %q", err, w)
				}
			}
		})
	}
}
