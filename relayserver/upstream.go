//go:build tsrelay_upstream_relayserver

package relayserver

// With the tsrelay_upstream_relayserver build tag the binary links
// Tailscale's own feature/relayserver instead of this package's extension,
// unguarded: the end-to-end test builds the relay this way to show that it
// detects the crash, and this is how the upstream feature comes back once
// tsrelay can build Tailscale ≥ 1.104.
import _ "tailscale.com/feature/relayserver"

// Name is the name Tailscale's relay server registers with
// tailscale.com/feature.
const Name = "relayserver"
