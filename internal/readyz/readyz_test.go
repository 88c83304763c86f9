package readyz

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestFieldNames decodes a document as users' scripts and dashboards see it,
// written out by hand, so that renaming a JSON field (which would break
// them) fails here even though the relay and its tests share the type.
func TestFieldNames(t *testing.T) {
	const doc = `{
	  "ready": true, "reason": "ok", "backendState": "Running",
	  "dnsName": "tsrelay.example.ts.net", "tailscaleIPs": ["100.64.0.9"],
	  "relay": {
	    "port": 40000, "prefsApplied": true, "bound": true,
	    "staticEndpoints": [{"endpoint": "192.0.2.7:61441", "source": "explicit"}],
	    "droppedEndpoints": [{"endpoint": "192.0.2.8:61441", "source": "service"}],
	    "service": "kube-public/tsrelay", "sessions": 1,
	    "sessionTable": [{"vni": 7, "clients": [
	      {"endpoint": "192.0.2.20:41641", "packetsTx": 3, "bytesTx": 300},
	      {"endpoint": "192.0.2.21:41641", "packetsTx": 4, "bytesTx": 400}]}]
	  },
	  "health": ["h"],
	  "pathMTU": {"ok": false, "needIPv4": 1348, "needIPv6": 1368,
	    "paths": [{"family": "ipv4", "interface": "eth0", "kind": "veth", "linkMTU": 1230, "mtu": 1230, "tooSmall": true}],
	    "tunnelInTunnel": "t", "error": "e"},
	  "warnings": ["w"],
	  "derp": {"serving": true, "regionID": 900, "regionCode": "tsrelay", "certName": "sha256-raw:ab",
	    "derpMap": {"Regions": {"900": {"RegionID": 900}}}, "noDERPMap": "n",
	    "meshPeers": [{"name": "tsrelay-1", "addr": "10.0.0.7:8443", "connected": true, "since": "2026-12-02T04:00:00Z", "error": "e"}]},
	  "state": {"secret": "kube-public/tsrelay-state", "unpersistedSince": "2026-12-02T04:00:00Z", "pendingKeys": 2}
	}`
	dec := json.NewDecoder(strings.NewReader(doc))
	dec.DisallowUnknownFields() // a renamed field is unknown here
	var s Status
	if err := dec.Decode(&s); err != nil {
		t.Fatalf("decode the documented form: %v", err)
	}
	r := s.Relay
	p := s.PathMTU
	if !s.Ready || s.Reason != "ok" || s.BackendState != "Running" || s.DNSName == "" || len(s.TailscaleIPs) != 1 ||
		r.Port != 40000 || !r.PrefsApplied || !r.Bound || len(r.StaticEndpoints) != 1 || r.StaticEndpoints[0].Source != "explicit" ||
		r.Service == "" || r.Sessions != 1 || len(r.SessionTable) != 1 || r.SessionTable[0].VNI != 7 ||
		r.SessionTable[0].Clients[1].BytesTx != 400 || len(s.Health) != 1 || len(s.Warnings) != 1 ||
		p == nil || p.NeedIPv4 != 1348 || p.NeedIPv6 != 1368 || len(p.Paths) != 1 || p.Paths[0].Interface != "eth0" ||
		p.Paths[0].LinkMTU != 1230 || p.Paths[0].MTU != 1230 || !p.Paths[0].TooSmall || p.TunnelInTunnel == "" || p.Error == "" ||
		s.DERP == nil || !s.DERP.Serving || s.DERP.RegionID != 900 || s.DERP.RegionCode == "" || s.DERP.CertName == "" ||
		s.DERP.DERPMap == nil || s.DERP.DERPMap.Regions[900] == nil || s.DERP.NoDERPMap == "" ||
		len(s.DERP.MeshPeers) != 1 || s.DERP.MeshPeers[0].Name == "" || s.DERP.MeshPeers[0].Addr == "" || !s.DERP.MeshPeers[0].Connected ||
		s.DERP.MeshPeers[0].Since.IsZero() || s.DERP.MeshPeers[0].Error == "" ||
		len(r.DroppedEndpoints) != 1 || s.State == nil || s.State.Secret == "" || s.State.UnpersistedSince == nil || s.State.PendingKeys != 2 {
		t.Errorf("decoded %+v; some documented field did not land", s)
	}
}
