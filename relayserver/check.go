package relayserver

import (
	"time"

	"tailscale.com/types/key"
	"tailscale.com/wgengine/magicsock"
)

// Reason says why an allocation request was rejected; it is the value of the
// reason label of tsrelay_relay_alloc_rejected_total.
type Reason string

// The reasons a request is rejected. ReasonNone means it passed.
const (
	ReasonNone        Reason = ""
	ReasonNoMessage   Reason = "no_message"
	ReasonZeroKey     Reason = "zero_disco_key"
	ReasonSameKeys    Reason = "same_disco_keys"
	ReasonNotSender   Reason = "sender_not_client"
	ReasonZeroNodeKey Reason = "zero_node_key"
	ReasonServerKey   Reason = "server_disco_key"
	ReasonRateLimited Reason = "rate_limited"
)

// reasons lists every rejection reason, so that the metric has a series
// for each from the start.
func reasons() []Reason {
	return []Reason{ReasonNoMessage, ReasonZeroKey, ReasonSameKeys, ReasonNotSender, ReasonZeroNodeKey, ReasonServerKey, ReasonRateLimited}
}

// Limits on one sender (a node key).
const (
	// AllocBurst and AllocRate bound the allocations one sender may ask
	// for: a burst of AllocBurst, then AllocRate a second. A client asks
	// once per peer it reaches through the relay, and again at most every
	// 30 s per peer, so these leave room for hundreds of relayed peers
	// while one member can hold at most about AllocBurst + 30×AllocRate
	// unbound sessions (30 s bind lifetime).
	AllocBurst = 200
	AllocRate  = 20
	// LogInterval is how often at most a sender's rejections are reported.
	LogInterval = time.Minute
	// maxSenders bounds the per-sender state; senders are tailnet members,
	// so this is only reached in very large tailnets, where the least
	// recently seen sender is forgotten.
	maxSenders = 4096
)

// Check reports why req must not reach the relay server, or ReasonNone.
// serverDisco is the server's own disco key, or zero while it is unknown.
// It never panics, whatever req holds.
func Check(req magicsock.UDPRelayAllocReq, serverDisco key.DiscoPublic) Reason {
	if req.Message == nil {
		return ReasonNoMessage
	}
	a, b := req.Message.ClientDisco[0], req.Message.ClientDisco[1]
	switch {
	case a.IsZero() || b.IsZero():
		return ReasonZeroKey
	case a == b:
		return ReasonSameKeys
	case req.RxFromDiscoKey != a && req.RxFromDiscoKey != b:
		return ReasonNotSender
	case req.RxFromNodeKey.IsZero():
		return ReasonZeroNodeKey
	case !serverDisco.IsZero() && (a == serverDisco || b == serverDisco):
		return ReasonServerKey
	}
	return ReasonNone
}
