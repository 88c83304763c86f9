package relay

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/tsrelay/tsrelay/internal/chans"
	"github.com/tsrelay/tsrelay/kubeevents"
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

// mtuWatcher checks the path MTU: once before the HTTP server answers, so
// that /readyz and /metrics never show an unchecked path, then whenever
// the network changes and every mtuCheckInterval. It reports only changes
// of the verdict, so a steady problem gives one log line and one Event.
type mtuWatcher struct {
	status *status
	events *kubeevents.Recorder
	logger *slog.Logger
	// changed asks for a check now; see poke.
	changed chan struct{}
}

func newMTUWatcher(st *status, events *kubeevents.Recorder, logger *slog.Logger) *mtuWatcher {
	return &mtuWatcher{status: st, events: events, logger: logger, changed: make(chan struct{}, 1)}
}

// poke asks for a check now without blocking; the node calls it when its
// network monitor sees routes or addresses change.
func (m *mtuWatcher) poke() { chans.Poke(m.changed) }

// run checks the path MTU on every poke and every mtuCheckInterval until
// ctx is done.
func (m *mtuWatcher) run(ctx context.Context) error {
	t := time.NewTicker(mtuCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-m.changed:
		case <-t.C:
		}
		m.check(ctx)
	}
}

// checkPathMTU finds and judges the path MTU, records the result and, when
// the verdict changed, logs it and records an Event.
func (m *mtuWatcher) check(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, mtuCheckTimeout)
	defer cancel()
	paths, err := pathmtu.Find(ctx)
	if err != nil {
		if m.status.setPathMTU(mtuCheck{err: err.Error(), checked: true}) {
			m.logger.Warn("cannot check the path MTU", "err", err)
		}
		return
	}
	r := pathmtu.Judge(paths)
	old := m.status.pathMTU()
	if !m.status.setPathMTU(mtuCheck{report: r, checked: true}) {
		return
	}
	if r.OK() {
		if !old.report.OK() {
			m.logger.Info("path MTU ok", pathAttrs(r.Paths)...)
			m.events.Normal("PathMTUOK", "path MTU large enough for relayed packets: "+pathList(r.Paths))
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
	m.logger.Warn(msg, attrs...)
	if len(r.TooSmall) > 0 {
		m.events.Warning("PathMTUTooSmall", pathmtu.Report{TooSmall: r.TooSmall}.Summary())
	}
	if r.Tunnel != "" {
		m.events.Warning("TunnelInTunnel", pathmtu.Report{Tunnel: r.Tunnel}.Summary())
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
