package relay

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"tailscale.com/net/netmon"

	"github.com/tsrelay/tsrelay/pathmtu"
)

// Timings of the path MTU check.
const (
	// mtuCheckInterval is how often the path MTU is checked besides at
	// start and on network changes. Tailscale's network monitor, which
	// announces route and address changes, ignores link messages, so an
	// MTU changed in place (`ip link set eth0 mtu …`) is noticed only by
	// this re-check. One check is two netlink round trips.
	mtuCheckInterval = 30 * time.Second
	// mtuCheckTimeout bounds one check; the kernel answers at once.
	mtuCheckTimeout = 5 * time.Second
)

// mtuCheck is the last path MTU check, for /readyz and /metrics.
type mtuCheck struct {
	report  pathmtu.Report
	err     string // why the check failed, or ""
	checked bool
}

// watchPathMTU checks the path MTU now, on every network change Tailscale's
// network monitor announces (see watchNetworkChanges) and every
// mtuCheckInterval, until ctx is done. It reports only changes of the
// verdict, so a steady problem gives one log line and one Event.
func (a *appliance) watchPathMTU(ctx context.Context) error {
	t := time.NewTicker(mtuCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.netChanged:
		case <-t.C:
		}
		a.checkPathMTU(ctx)
	}
}

// watchNetworkChanges asks watchPathMTU for a check whenever the node's
// network monitor sees routes or addresses change. It returns the function
// that stops the watch.
func (a *appliance) watchNetworkChanges() (stop func()) {
	nm, ok := a.ts.Sys().NetMon.GetOK()
	if !ok {
		return func() {}
	}
	return nm.RegisterChangeCallback(func(*netmon.ChangeDelta) {
		select {
		case a.netChanged <- struct{}{}:
		default:
		}
	})
}

// checkPathMTU finds and judges the path MTU, records the result and, when
// the verdict changed, logs it and records an Event.
func (a *appliance) checkPathMTU(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, mtuCheckTimeout)
	defer cancel()
	paths, err := pathmtu.Find(ctx)
	if err != nil {
		if a.status.setPathMTU(mtuCheck{err: err.Error(), checked: true}) {
			a.logger.Warn("cannot check the path MTU", "err", err)
		}
		return
	}
	r := pathmtu.Judge(paths)
	old := a.status.pathMTU()
	if !a.status.setPathMTU(mtuCheck{report: r, checked: true}) {
		return
	}
	if r.OK() {
		if !old.report.OK() {
			a.logger.Info("path MTU ok", pathAttrs(r.Paths)...)
			a.events.Normal("PathMTUOK", "path MTU large enough for relayed packets: "+pathList(r.Paths))
		}
		return
	}
	attrs := pathAttrs(r.Paths)
	attrs = append(attrs, "needIPv4", pathmtu.NeededIPv4, "needIPv6", pathmtu.NeededIPv6)
	msg := "path MTU too small for relayed packets"
	if r.Tunnel != "" {
		attrs = append(attrs, "tunnelInTunnel", r.Tunnel, "fix", pathmtu.FixHint)
		if len(r.TooSmall) == 0 {
			msg = "tunnel inside a tunnel"
		}
	}
	a.logger.Warn(msg, attrs...)
	if len(r.TooSmall) > 0 {
		a.events.Warning("PathMTUTooSmall", pathmtu.Report{TooSmall: r.TooSmall}.Summary())
	}
	if r.Tunnel != "" {
		a.events.Warning("TunnelInTunnel", pathmtu.Report{Tunnel: r.Tunnel}.Summary())
	}
}

// pathAttrs gives each path's interface and MTU as log attributes, e.g.
// ipv4Interface=eth0 ipv4MTU=1230.
func pathAttrs(paths []pathmtu.Path) []any {
	var attrs []any
	for _, p := range paths {
		attrs = append(attrs, slog.String(string(p.Family)+"Interface", p.Interface), slog.Int(string(p.Family)+"MTU", p.MTU()))
	}
	return attrs
}

// pathList formats paths for an Event as "ipv4 via eth0 MTU 1500, …".
func pathList(paths []pathmtu.Path) string {
	s := make([]string, len(paths))
	for i, p := range paths {
		s[i] = fmt.Sprintf("%s via %s MTU %d", p.Family, p.Interface, p.MTU())
	}
	return strings.Join(s, ", ")
}

// setPathMTU records a check and reports whether its verdict differs from
// the last one: another interface or MTU, another problem, or another
// error.
func (s *status) setPathMTU(c mtuCheck) (changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.mtu
	s.mtu = c
	return !old.checked || old.err != c.err || old.report.Tunnel != c.report.Tunnel ||
		!slices.Equal(old.report.Paths, c.report.Paths)
}

// pathMTU returns the last check.
func (s *status) pathMTU() mtuCheck {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mtu
}

// pathMTUJSON is the path MTU part of the verbose /readyz.
type pathMTUJSON struct {
	// OK is true when relayed packets fit and no tunnel inside a tunnel
	// was seen. It does not affect readiness.
	OK       bool       `json:"ok"`
	NeedIPv4 int        `json:"needIPv4"`
	NeedIPv6 int        `json:"needIPv6"`
	Paths    []pathJSON `json:"paths"`
	// TunnelInTunnel says why the pod network looks like a tunnel inside a
	// Tailscale tunnel.
	TunnelInTunnel string `json:"tunnelInTunnel,omitempty"`
	Error          string `json:"error,omitempty"`
}

type pathJSON struct {
	pathmtu.Path
	MTU      int  `json:"mtu"`
	TooSmall bool `json:"tooSmall"`
}

// pathMTUStatus converts a check for the verbose /readyz; nil before the
// first check.
func pathMTUStatus(c mtuCheck) *pathMTUJSON {
	if !c.checked {
		return nil
	}
	out := &pathMTUJSON{
		OK:             c.err == "" && c.report.OK(),
		NeedIPv4:       pathmtu.NeededIPv4,
		NeedIPv6:       pathmtu.NeededIPv6,
		Paths:          []pathJSON{},
		TunnelInTunnel: c.report.Tunnel,
		Error:          c.err,
	}
	for _, p := range c.report.Paths {
		out.Paths = append(out.Paths, pathJSON{Path: p, MTU: p.MTU(), TooSmall: p.TooSmall()})
	}
	return out
}
