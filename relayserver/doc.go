// Package relayserver is tsrelay's own peer relay server extension: it runs
// Tailscale's [udprelay.Server] inside the relay's tailnet node in place of
// tailscale.com/feature/relayserver, and checks every allocation request a
// peer sends before the server sees it.
//
// # Why it exists
//
// In tailscale.com v1.102.5 one message from any tailnet member that the
// policy grants the relay capability kills the whole relay process. magicsock
// checks an AllocateUDPRelayEndpointRequest that arrives over DERP only for
// the sender's own disco key being one of the two ClientDisco keys and for the
// relay grant (wgengine/magicsock/magicsock.go, handleDiscoMessage); the other
// key may be all zeros. feature/relayserver hands both keys to
// [udprelay.Server.AllocateEndpoint], which computes a shared key with each,
// and key.DiscoPrivate.Shared panics on a zero key. The panic happens on an
// event-bus goroutine, so it takes down the relay sockets, the tailnet node
// and the in-cluster DERP region, and the sender can repeat it after every
// restart. Tailscale fixed it in v1.104.0 (tailscale/tailscale#21273), which
// cannot be built here (it needs Go 1.27 and a gvisor version the module proxy
// does not serve). When the proxy serves Tailscale ≥ 1.104's dependencies, the
// upstream feature comes back (build with the tsrelay_upstream_relayserver tag
// to get it today) and this package's tests stay: the end-to-end test in
// cmd/relay sends the malicious request to the real binary, whichever
// extension it links.
//
// # What it checks, and why each check
//
// Read against net/udprelay/server.go at v1.102.5 (AllocateEndpoint, its
// helpers and the packet path it sets up). [Check] rejects:
//
//   - a request with no message (the upstream extension dereferences it);
//   - a zero ClientDisco key (key.DiscoPrivate.Shared panics: the crash);
//   - two equal ClientDisco keys (no panic, but a "session" of one peer with
//     itself: both legs share one key, and the server relays a peer's packets
//     back to itself);
//   - a sender whose disco key is not one of the two (magicsock checks this
//     too; checked again so that this package does not rely on it);
//   - a zero sender node key (the answer could not be addressed);
//   - a ClientDisco equal to the server's own disco key (AllocateEndpoint
//     refuses it itself with an error; the extension checks it first once it
//     knows the key, which the server reveals only in its first answer).
//
// The extension also limits how fast one sender may allocate
// ([AllocBurst], [AllocRate]): every new pair of keys makes the server hold a
// session for its 30 s bind lifetime, and nothing else bounds how many one
// member can make. What else AllocateEndpoint does was checked and needs
// nothing: a closed or not-yet-ready server returns an error; the VNI pool
// (2^24) returns an error when exhausted; an existing pair is returned
// unchanged; Generation is only echoed back.
//
// Rejections are counted in tsrelay_relay_alloc_rejected_total{reason} (a
// Tailscale user metric, so it appears on the relay's /metrics next to
// tailscaled_peer_relay_*) and published on the node's event bus as
// [Rejected], at most once per [LogInterval] per sender, for the relay to log.
// There is no recover: a check that is missing is a crash that a test finds.
//
// The extension serves the local API's debug-peer-relay-sessions as the
// upstream feature does (`tailscale debug peer-relay-sessions` reads it),
// and the relay's readiness and tsrelay_relay_sessions read the server
// through it: tsnet's local client is in memory, so that costs no network
// round trip, and the relay's code is the same whichever extension is
// linked. The server's own metrics (tailscaled_peer_relay_*) keep their
// names and labels: udprelay.NewServer registers them in the node's user
// metrics, as before. It always lets the server add the addresses it
// discovers to the static endpoints (onlyStaticAddrPorts false), as the
// upstream feature does.
//
// # The socket filter
//
// The server's sockets face the internet, and its read loop (v1.102.5) wakes
// and makes a recvmmsg call for every datagram or two that arrives, whatever
// it holds: a junk flood costs the relay about 11 µs of CPU a datagram at
// 10,000 a second. Each time it starts the server, the extension finds the
// server's sockets among the process's open files (internal/udpsock: the
// server does not hand them out) and attaches a classic BPF filter that
// passes only what the server acts on (see packetFilter): Geneve as
// Tailscale's clients write it, and STUN binding success responses. The
// kernel drops the rest before it is queued, and counts it in the socket's
// drops (tsrelay_relay_socket_drops_total). A kernel or sandbox that refuses
// socket filters leaves the sockets unfiltered, and the relay logs a warning
// and records an Event ([SocketsFiltered]).
//
// The relay's own node is also a relay client, and v1.102.5's client side
// panics on a zero ServerDisco in a CallMeMaybeVia or an allocation answer
// (wgengine/magicsock/relaymanager.go, ensureDiscoInfoFor); see the README's
// Reliability section for how tsrelay closes that.
package relayserver
