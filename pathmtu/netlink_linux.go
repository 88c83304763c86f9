package pathmtu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/jsimonetti/rtnetlink"
	"golang.org/x/sys/unix"
)

// netlinkTimeout bounds one lookup when ctx has no earlier deadline. The
// kernel answers route and link queries at once; this only guards against
// a sandbox (gVisor, say) that never answers.
const netlinkTimeout = 2 * time.Second

// lookup asks the kernel for the route to dst (RTM_GETROUTE, as `ip route
// get` does) and for the interface it leaves through (RTM_GETLINK). ok is
// false when there is no route (no default route for that family).
func lookup(ctx context.Context, dst netip.Addr) (p Path, ok bool, err error) {
	c, err := rtnetlink.Dial(nil)
	if err != nil {
		return Path{}, false, fmt.Errorf("open netlink socket: %w", err)
	}
	defer c.Close()
	deadline := time.Now().Add(netlinkTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := c.SetReadDeadline(deadline); err != nil {
		return Path{}, false, fmt.Errorf("set netlink deadline: %w", err)
	}

	req := &rtnetlink.RouteMessage{
		Family:     unix.AF_INET,
		DstLength:  32,
		Attributes: rtnetlink.RouteAttributes{Dst: net.IP(dst.AsSlice())},
	}
	if dst.Is6() {
		req.Family, req.DstLength = unix.AF_INET6, 128
	}
	routes, err := c.Route.Get(req)
	if errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EHOSTUNREACH) {
		return Path{}, false, nil
	}
	if err != nil {
		return Path{}, false, fmt.Errorf("route to %s: %w", dst, err)
	}
	if len(routes) == 0 || routes[0].Attributes.OutIface == 0 {
		return Path{}, false, fmt.Errorf("route to %s: no output interface", dst)
	}
	route := routes[0].Attributes
	if route.Metrics != nil {
		p.RouteMTU = int(route.Metrics.MTU)
	}

	link, err := c.Link.Get(route.OutIface)
	if err != nil {
		return Path{}, false, fmt.Errorf("interface %d of the route to %s: %w", route.OutIface, dst, err)
	}
	if a := link.Attributes; a != nil {
		p.Interface, p.LinkMTU = a.Name, int(a.MTU)
		if a.Info != nil {
			p.Kind = a.Info.Kind
		}
	}
	if p.Interface == "lo" {
		return Path{}, false, nil // a local destination, not a path out
	}
	return p, true, nil
}
