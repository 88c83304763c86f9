package tailnettest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/disco"
	"tailscale.com/net/netaddr"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// Member is a hand-rolled tailnet node: the control server knows it (with
// its node and disco keys, an address, DERP region 1 as its home, and every
// grant the control hands out, the relay one among them), but no tailscaled
// runs it. The test holds its private keys, so it can seal any disco message
// a real node could send, including ones a real node never would, and send
// it over the test DERP server as that node.
type Member struct {
	Node  key.NodePrivate
	Disco key.DiscoPrivate
	// Addr is its tailnet address.
	Addr netip.Addr

	derp *derphttp.Client
	rx   chan DiscoFrom // from receive
}

// AddMember registers a new member with c's control server (id picks its
// node ID and address; use a different one for each member) and connects
// it to c's DERP server. Close disconnects it.
func AddMember(ctx context.Context, c *Control, name string, id uint8) (*Member, error) {
	m := &Member{Node: key.NewNode(), Disco: key.NewDisco(), Addr: netaddr.IPv4(100, 64, 126, id)}
	// IDs and addresses from a block that testcontrol, which counts nodes
	// from 1, does not reach in a test.
	nodeID := tailcfg.NodeID(0x7e00 | int64(id))
	prefix := netip.PrefixFrom(m.Addr, 32)
	hi := &tailcfg.Hostinfo{Hostname: name}
	c.Server.UpdateNode(&tailcfg.Node{
		ID:                nodeID,
		StableID:          tailcfg.StableNodeID(fmt.Sprintf("member-%s", name)),
		Name:              name + ".fake-control.example.net.",
		User:              tailcfg.UserID(nodeID),
		Key:               m.Node.Public(),
		Machine:           key.NewMachine().Public(),
		DiscoKey:          m.Disco.Public(),
		Addresses:         []netip.Prefix{prefix},
		AllowedIPs:        []netip.Prefix{prefix},
		HomeDERP:          1,
		Hostinfo:          hi.View(),
		MachineAuthorized: true,
		Cap:               tailcfg.CurrentCapabilityVersion,
	})
	region := c.DERPMap.Regions[1]
	m.derp = derphttp.NewRegionClient(m.Node, logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	if err := m.derp.Connect(ctx); err != nil {
		return nil, fmt.Errorf("member %s: connect to DERP: %w", name, err)
	}
	m.rx = make(chan DiscoFrom, 64)
	go m.receive()
	return m, nil
}

// Close disconnects the member from DERP.
func (m *Member) Close() error { return m.derp.Close() }

// SendDisco seals msg to the node with node key to and disco key toDisco and
// sends it over DERP, framed as magicsock frames disco: the magic, the
// sender's disco key, then a box sealed with the two disco keys.
func (m *Member) SendDisco(to key.NodePublic, toDisco key.DiscoPublic, msg disco.Message) error {
	shared := m.Disco.Shared(toDisco)
	pkt := append([]byte(disco.Magic), m.Disco.Public().AppendTo(nil)...)
	pkt = append(pkt, shared.Seal(msg.AppendMarshal(nil))...)
	if err := m.derp.Send(to, pkt); err != nil {
		return fmt.Errorf("send disco over DERP: %w", err)
	}
	return nil
}

// DiscoFrom is a disco message a Member received, with who sent it.
type DiscoFrom struct {
	Node  key.NodePublic  // as the DERP server saw the sender
	Disco key.DiscoPublic // the key the box was sealed with
	Msg   disco.Message
}

// receive reads from DERP until the client is closed, and passes on the
// disco messages it can open and parse. What a peer sends is not trusted:
// a zero sender key, a short frame or a bad box is skipped.
func (m *Member) receive() {
	defer close(m.rx)
	hdr := len(disco.Magic) + key.DiscoPublicRawLen
	for {
		rm, err := m.derp.Recv()
		if err != nil {
			return
		}
		p, ok := rm.(derp.ReceivedPacket)
		if !ok || len(p.Data) < hdr || string(p.Data[:len(disco.Magic)]) != disco.Magic {
			continue // not disco (WireGuard, or a DERP control frame)
		}
		from := key.DiscoPublicFromRaw32(mem.B(p.Data[len(disco.Magic):hdr]))
		if from.IsZero() {
			continue
		}
		plain, ok := m.Disco.Shared(from).Open(p.Data[hdr:])
		if !ok {
			continue
		}
		msg, err := disco.Parse(plain)
		if err != nil {
			continue
		}
		select {
		case m.rx <- DiscoFrom{Node: p.Source, Disco: from, Msg: msg}:
		default: // nobody is reading; drop, as a lossy network would
		}
	}
}

// RecvDisco returns the next received disco message for which want returns
// true, skipping others, or an error when ctx is done first.
func (m *Member) RecvDisco(ctx context.Context, want func(DiscoFrom) bool) (DiscoFrom, error) {
	for {
		select {
		case d, ok := <-m.rx:
			if !ok {
				return DiscoFrom{}, errors.New("the member's DERP connection is closed")
			}
			if want(d) {
				return d, nil
			}
		case <-ctx.Done():
			return DiscoFrom{}, fmt.Errorf("no matching disco message: %w", ctx.Err())
		}
	}
}

// NodeByHostname returns the node the control server knows under the
// hostname name, or nil.
func (c *Control) NodeByHostname(name string) *tailcfg.Node {
	for _, n := range c.Server.AllNodes() {
		if n.Hostinfo.Valid() && n.Hostinfo.Hostname() == name {
			return n
		}
	}
	return nil
}
