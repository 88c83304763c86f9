package bench

import "strings"

// Path scenarios.
const (
	scDirect = "direct UDP"
	scDERP   = "DERP only"
	scRelay  = "tsrelay peer relay"
	scRelay6 = "tsrelay peer relay over IPv6"
	scStock  = "stock tailscaled peer relay"
	// The same relays sized for a 16-core node: tsrelay told to bind 16
	// sockets per family, the stock relay with GOMAXPROCS=16 (what a pod
	// without a CPU limit gets there; its socket count follows).
	scRelay16 = "tsrelay peer relay, TS_RELAY_SERVER_SOCKETS=16"
	scStock16 = "stock tailscaled peer relay, GOMAXPROCS=16"
)

// bigNode is the GOMAXPROCS a 16-core node gives a pod without a CPU
// limit. Every relay variant but the stock one at 2 runs with it, so that
// what tsrelay binds by default is seen on such a node.
const bigNode = "GOMAXPROCS=16"

// variant is one relay the relayed scenarios run: tsrelay or the stock
// relay, with extra environment.
type variant struct {
	name  string
	stock bool
	env   []string
	// ipv6: peers reach the relay over IPv6 only; noLoad: no memory rows.
	ipv6, noLoad bool
}

// variants returns the relays to run: tsrelay at its default socket count
// (over IPv4, then over IPv6 with no memory rows) and the stock relay at
// GOMAXPROCS 2 (this machine's) for the path rows;
// then, for the footprint rows, both sized for a 16-core node, and one
// tsrelay per lever.
func (c *Config) variants() []variant {
	vs := []variant{
		{name: scRelay, env: []string{bigNode}},
		{name: scRelay6, env: []string{bigNode}, ipv6: true, noLoad: true},
		{name: scStock, stock: true, env: []string{"GOMAXPROCS=2"}},
	}
	if c.Smoke {
		return vs[:1]
	}
	vs = append(vs,
		variant{name: scRelay16, env: []string{bigNode, "TS_RELAY_SERVER_SOCKETS=16"}},
		variant{name: scStock16, stock: true, env: []string{bigNode}},
	)
	for _, l := range c.Levers {
		vs = append(vs, variant{name: leverName(l), env: append([]string{bigNode}, l...)})
	}
	return vs
}

// leverName is the scenario name of a tsrelay lever variant.
func leverName(env []string) string { return scRelay + ", " + strings.Join(env, " ") }

// Pod link MTU of every relay but the MTU row's: an ordinary pod network.
const podMTU = 1500

// relayPort is the relays' UDP port, in their own pod namespaces.
const relayPort = 40000
