package relay

import (
	"context"
	"errors"
	"net/netip"

	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tsrelay/tsrelay/derpregion"
	"github.com/tsrelay/tsrelay/internal/kubeclient"
)

// DERPConfig are the settings of the in-cluster DERP region, which package
// derpregion reads, checks and runs; embedded in Config under this name so
// that its variables are decoded and listed with the relay's.
type DERPConfig = derpregion.Config

// derpHost is what the DERP region needs to know of the relay's own
// settings.
func (c *Config) derpHost() derpregion.Host {
	return derpregion.Host{
		RelayPort:       uint16(c.RelayServerPort),
		WireGuardPort:   uint16(c.WireGuardPort),
		HTTPAddr:        netip.AddrPort(c.LocalAddrPort),
		StaticEndpoints: c.RelayServerStaticEndpoints,
		InCluster:       c.KubeSecret != "",
		Service:         c.RelayService,
	}
}

// derpDeps are the seams through which the DERP region reaches the relay:
// this node (which admits its clients), the endpoints it advertises, its
// state store (where the self-signed certificate is kept) and its Events.
func (n *tailnetNode) derpDeps(kc *kubeclient.Client) derpregion.Deps {
	return derpregion.Deps{
		Host:             n.cfg.derpHost(),
		Tailnet:          derpTailnet{n},
		Endpoints:        n.status.advertised,
		EndpointsChanged: n.status.endpointsChanged(),
		Events:           n.events,
		Kube:             kc,
		State:            n.ts.Store,
		StateDir:         n.cfg.StateDir,
		Logger:           n.logger,
	}
}

// derpTailnet is the relay's tailnet node as the DERP region asks
// it (derpregion.Tailnet), refusing everyone before it has started.
type derpTailnet struct{ node *tailnetNode }

var errNodeNotStarted = errors.New("tailnet node not started")

func (n derpTailnet) StatusWithoutPeers(ctx context.Context) (*ipnstate.Status, error) {
	lc := n.node.localClient()
	if lc == nil {
		return nil, errNodeNotStarted
	}
	return lc.StatusWithoutPeers(ctx)
}

func (n derpTailnet) WhoIsNodeKey(ctx context.Context, k key.NodePublic) (*apitype.WhoIsResponse, error) {
	lc := n.node.localClient()
	if lc == nil {
		return nil, errNodeNotStarted
	}
	return lc.WhoIsNodeKey(ctx, k)
}

func (n derpTailnet) Status(ctx context.Context) (*ipnstate.Status, error) {
	lc := n.node.localClient()
	if lc == nil {
		return nil, errNodeNotStarted
	}
	return lc.Status(ctx)
}

func (n derpTailnet) CurrentDERPMap(ctx context.Context) (*tailcfg.DERPMap, error) {
	lc := n.node.localClient()
	if lc == nil {
		return nil, errNodeNotStarted
	}
	return lc.CurrentDERPMap(ctx)
}
