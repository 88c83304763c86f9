package relaycheck

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/net/stun"
	"tailscale.com/net/tlsdial"
	"tailscale.com/tailcfg"

	"github.com/tsrelay/tsrelay/derpregion"
)

// HomeRegion is a peer's home DERP region, through which this laptop's
// first packets to it go, and whether this laptop can reach it.
type HomeRegion struct {
	// Code and ID identify the region ("tsrelay", 900).
	Code string `json:"code"`
	ID   int    `json:"id,omitempty"`
	// InCluster is true for a region served by a tsrelay (its generated
	// name or its self-signed host name).
	InCluster bool `json:"inCluster"`
	// Reachable, checked only for an in-cluster region: true once a DERP
	// login by this laptop was admitted there (a pong came through the
	// region during the check: the region's admission let this laptop's
	// node key in); false when this laptop cannot complete a TLS
	// handshake with the region's pinned certificate (probeRegion);
	// absent when the handshake works but no login was seen, which
	// proves nothing: the region admits only nodes its relay can see.
	// A node homed there is reachable over DERP only by nodes the region
	// admits.
	Reachable *bool `json:"reachable,omitempty"`
	// Reason says why it is not reachable, or why it could not be checked.
	Reason string `json:"reason,omitempty"`
}

// inCluster reports whether r looks like a region a tsrelay serves: the
// name derpregion.Region gives it, or a node with its self-signed host
// name. A user can rename a region; then it is not recognised.
func inCluster(r *tailcfg.DERPRegion) bool {
	if strings.HasPrefix(r.RegionName, derpregion.RegionNamePrefix) {
		return true
	}
	for _, n := range r.Nodes {
		if n.HostName == derpregion.SelfSignedHostName {
			return true
		}
	}
	return false
}

// regionProbeTimeout bounds each dial, handshake and STUN exchange of a
// region probe.
const regionProbeTimeout = 3 * time.Second

// homeRegions looks up the home region of each peer code in the laptop's
// DERP map and, for in-cluster regions, probes once per region whether the
// laptop can reach it (probeRegion). Errors become the Reason of the
// regions affected.
func homeRegions(ctx context.Context, lc LocalAPI, codes []string) map[string]*HomeRegion {
	out := map[string]*HomeRegion{}
	for _, c := range codes {
		if c != "" {
			out[c] = &HomeRegion{Code: c}
		}
	}
	if len(out) == 0 {
		return out
	}
	dm, err := lc.CurrentDERPMap(ctx)
	if err != nil {
		for _, h := range out {
			h.Reason = fmt.Sprintf("cannot read this laptop's DERP map: %v", err)
		}
		return out
	}
	var wg sync.WaitGroup
	for _, r := range dm.Regions {
		h := out[r.RegionCode]
		if h == nil {
			continue
		}
		h.ID, h.InCluster = r.RegionID, inCluster(r)
		if !h.InCluster {
			continue
		}
		wg.Go(func() {
			ok, reason := probeRegion(ctx, r)
			if !ok {
				h.Reachable, h.Reason = new(false), reason
				return
			}
			h.Reason = "TLS with the pinned certificate works, but no DERP login by this laptop was seen admitted " +
				"(no pong came through the region during the check)"
			if reason != "" {
				h.Reason += "; " + reason
			}
		})
	}
	wg.Wait()
	return out
}

// confirmAdmission marks reachable the in-cluster regions through which a
// pong came during the check: this laptop's tailscaled logged in there with
// its own node key and was admitted. TLS alone proves only that the port
// answers: the region refuses every node its relay cannot see.
func confirmAdmission(homes map[string]*HomeRegion, runs []peerRun) {
	for _, r := range runs {
		for _, p := range r.pongs {
			h := homes[p.path.region]
			if p.path.kind != ViaDERP || h == nil || !h.InCluster || h.Reachable != nil {
				continue
			}
			h.Reachable, h.Reason = new(true), ""
		}
	}
}

// probeRegion checks from this machine what a Tailscale client needs of
// r: a TLS handshake on the DERP port presenting the certificate the
// derpMap expects (its sha256-raw pin, or a CA-issued certificate for its
// host name), and a STUN answer. It does not speak DERP: a login needs this
// laptop's node key, which only tailscaled holds, so admission is judged
// from the pongs instead (confirmAdmission), and the region's refusal
// counter never sees the probe.
//
// Not `tailscale debug derp` (LocalAPI debug-derp-region): at v1.102.5 it
// dials a node's IPv6 "none" as a host name, a DNS query, and reports an
// error for every family a node does not have (checked 2026-12).
func probeRegion(ctx context.Context, r *tailcfg.DERPRegion) (reachable bool, reason string) {
	var problems []string
	for _, n := range r.Nodes {
		if n.STUNOnly {
			continue
		}
		for _, host := range nodeHosts(n) {
			if err := probeTLS(ctx, n, host); err != nil {
				problems = append(problems, err.Error())
				continue
			}
			reachable = true
			if err := probeSTUN(ctx, n, host); err != nil {
				problems = append(problems, err.Error()+" (DERP works; nodes measure the region by HTTPS instead)")
			}
		}
	}
	if !reachable && len(problems) == 0 {
		problems = append(problems, "the region has no DERP node with an address")
	}
	return reachable, strings.Join(problems, "; ")
}

// nodeHosts are the addresses a client dials for n: its IP literals, or
// its host name when it gives none (a CA-issued certificate's DNS name).
func nodeHosts(n *tailcfg.DERPNode) []string {
	var hosts []string
	for _, s := range []string{n.IPv4, n.IPv6} {
		if ip, err := netip.ParseAddr(s); err == nil {
			hosts = append(hosts, ip.String())
		}
	}
	if len(hosts) == 0 && n.IPv4 == "" && n.IPv6 == "" {
		hosts = append(hosts, n.HostName)
	}
	return hosts
}

func probeTLS(ctx context.Context, n *tailcfg.DERPNode, host string) error {
	port := n.DERPPort
	if port == 0 {
		port = 443
	}
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	ctx, cancel := context.WithTimeout(ctx, regionProbeTimeout)
	defer cancel()
	conf := &tls.Config{ServerName: n.HostName, NextProtos: []string{"http/1.1"}}
	// As derphttp.Client.tlsClient does.
	if pin, ok := strings.CutPrefix(n.CertName, "sha256-raw:"); ok {
		tlsdial.SetConfigExpectedCertHash(conf, pin)
	} else if n.CertName != "" {
		tlsdial.SetConfigExpectedCert(conf, n.CertName)
	}
	d := &tls.Dialer{Config: conf}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("DERP over TLS to %s: %w", addr, err)
	}
	c.Close()
	return nil
}

func probeSTUN(ctx context.Context, n *tailcfg.DERPNode, host string) error {
	if n.STUNPort < 0 {
		return nil // STUN turned off for this node
	}
	port := n.STUNPort
	if port == 0 {
		port = 3478
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return nil // a host name: tailscaled resolves it; not probed here
	}
	dst := netip.AddrPortFrom(ip, uint16(port))
	pc, err := net.ListenUDP("udp", nil)
	if err != nil {
		return fmt.Errorf("STUN to %s: %w", dst, err)
	}
	defer pc.Close()
	deadline := time.Now().Add(regionProbeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	pc.SetDeadline(deadline)
	tx := stun.NewTxID()
	if _, err := pc.WriteToUDPAddrPort(stun.Request(tx), dst); err != nil {
		return fmt.Errorf("STUN to %s: %w", dst, err)
	}
	buf := make([]byte, 1500)
	for {
		nr, err := pc.Read(buf)
		if err != nil {
			return fmt.Errorf("no STUN answer from udp %s (UDP blocked?): %w", dst, err)
		}
		if got, _, err := stun.ParseResponse(buf[:nr]); err == nil && got == tx {
			return nil
		}
	}
}

// homeLine is the text report's line for a peer's home region.
func homeLine(h *HomeRegion) string {
	if h == nil {
		return ""
	}
	s := "home DERP region " + h.Code
	if !h.InCluster {
		return s
	}
	s += " (in-cluster, served by a tsrelay)"
	switch {
	case h.Reachable == nil && strings.HasPrefix(h.Reason, "TLS with the pinned"):
		s += ": admission not confirmed: " + h.Reason
	case h.Reachable == nil:
		s += ": not checked: " + h.Reason
	case *h.Reachable:
		s += ": reachable from here"
	default:
		s += ": NOT reachable from here, so this laptop's first packets to it have no path: " + h.Reason
	}
	return s
}
