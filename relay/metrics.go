package relay

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"runtime"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"tailscale.com/ipn"
	tsversion "tailscale.com/version"

	"github.com/tsrelay/tsrelay/internal/readyz"
	"github.com/tsrelay/tsrelay/internal/udpsock"
	"github.com/tsrelay/tsrelay/lbaddr"
	"github.com/tsrelay/tsrelay/pathmtu"
)

// backendStates are the values of tsrelay_backend_state's state label.
var backendStates = []ipn.State{ipn.NoState, ipn.NeedsLogin, ipn.NeedsMachineAuth, ipn.Stopped, ipn.Starting, ipn.Running}

// collector exposes tsrelay's own series, read from the status at scrape
// time so that they always agree with /readyz, while the identity is held
// elsewhere too.
type collector struct {
	h *handlers

	ready, waiting, backendState, bound, endpoints *prometheus.Desc
	relayClient                                    *prometheus.Desc
	sessions, unpersisted, dropped                 *prometheus.Desc
	writes, failures, conflicts, buildInfo         *prometheus.Desc
	recreated                                      *prometheus.Desc
	identity                                       *prometheus.Desc
	pathMTU, pathMTUNeeded, mtuTooSmall, tunnel    *prometheus.Desc
	sockets, socketsSetting, socketDrops           *prometheus.Desc
}

func newCollector(h *handlers) *collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("tsrelay_"+name, help, labels, nil)
	}
	return &collector{
		h:              h,
		ready:          d("ready", "1 when /readyz answers 200: logged in, relay settings applied, relay socket bound, an endpoint known."),
		waiting:        d("identity_waiting", "1 while another process holds this node identity (its Lease or state directory lock) and this one waits."),
		unpersisted:    d("state_unpersisted_seconds", "How long the state Secret has lacked writes the relay made (0 when it holds them all); a restart now would lose them, perhaps the node identity."),
		dropped:        d("static_endpoints_dropped", "Endpoints found but not advertised: explicit plus Service-found addresses beyond the 16 a relay advertises (explicit ones are kept first)."),
		backendState:   d("backend_state", "1 for the Tailscale backend's current state, 0 for the others.", "state"),
		bound:          d("relay_bound", "1 when the peer relay's UDP socket is bound."),
		relayClient:    d("relay_client_enabled", "1 when the tailnet lets the relay's own node use other peer relays (no disable-relay-client node attribute); at Tailscale v1.102.5 any peer can then crash it, see the README's Reliability section."),
		endpoints:      d("static_endpoints", "Static endpoints advertised to peers, by where they came from.", "source"),
		sessions:       d("relay_sessions", "Relay sessions (pairs of peers) the relay server holds now."),
		writes:         d("state_writes_total", "State writes the Kubernetes API server accepted."),
		failures:       d("state_write_failures_total", "State writes that failed; the node's identity may not survive a restart."),
		conflicts:      d("state_write_conflicts_total", "State writes retried because someone else changed the Secret."),
		recreated:      d("state_secret_recreated_total", "Times the state Secret was found deleted and created again from memory."),
		pathMTU:        d("path_mtu_bytes", "MTU of the route to the internet, by IP family and the interface it leaves through (the route's own MTU if it sets one).", "family", "interface"),
		pathMTUNeeded:  d("path_mtu_needed_bytes", "Largest relayed packet on a path of this IP family: Tailscale's 1280-byte inner MTU plus WireGuard, Geneve, UDP and IP headers.", "family"),
		mtuTooSmall:    d("path_mtu_too_small", "1 when relayed packets do not fit the path MTU of some IP family: they are fragmented or dropped, and relaying slows down."),
		tunnel:         d("path_tunnel_in_tunnel", "1 when the pod network looks like a tunnel inside a Tailscale tunnel (route through a WireGuard or Tailscale interface, or an MTU of 1280 minus an encapsulation)."),
		sockets:        d("relay_sockets", "UDP sockets the peer relay has bound on its port, by IP family, counted in /proc; each can hold 8 MiB of receive buffers.", "family"),
		socketDrops:    d("relay_socket_drops_total", "Datagrams the kernel dropped at the peer relay's UDP sockets, by IP family, read from /proc: junk their socket filter refused (anything but Geneve as Tailscale sends it and STUN answers), or a full receive buffer.", "family"),
		socketsSetting: d("relay_sockets_setting", "TS_RELAY_SERVER_SOCKETS: the sockets per IP family the relay binds (GOMAXPROCS)."),
		buildInfo:      d("build_info", "Always 1; the labels say what is running.", "version", "tailscale_version", "go_version"),
		identity:       d("identity_info", "Always 1; the labels say which node identity this process runs or waits for (TS_HOSTNAME, the state Secret as namespace/name or TS_STATE_DIR, and the MagicDNS name once logged in), so that the series of several replicas tell which relay they are.", "hostname", "state", "dns_name"),
	}
}

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v))
	}
	st := c.h.status.snapshot()
	id := c.h.status.nodeIdentity()
	p := c.h.parts()
	gauge(c.ready, bit(st.Ready))
	gauge(c.waiting, bit(id.waiting))
	gauge(c.dropped, float64(len(st.Relay.DroppedEndpoints)))
	for _, s := range backendStates {
		gauge(c.backendState, bit(st.BackendState == s.String()), s.String())
	}
	gauge(c.bound, bit(st.Relay.Bound))
	gauge(c.relayClient, bit(st.Relay.ClientEnabled))
	for _, src := range []lbaddr.Source{lbaddr.SourceExplicit, lbaddr.SourceService, lbaddr.SourceDNS} {
		n := 0
		for _, e := range st.Relay.StaticEndpoints {
			if e.Source == string(src) {
				n++
			}
		}
		gauge(c.endpoints, float64(n), string(src))
	}
	sessions := st.Relay.Sessions // as of the last reconcile pass
	if st.Relay.Bound {
		if table, ok := p.node.relaySessions(context.Background()); ok {
			sessions = len(table)
		}
	}
	gauge(c.sessions, float64(sessions))
	if p.store != nil {
		s := p.store.Stats()
		counter(c.writes, s.Writes)
		counter(c.failures, s.Failures)
		counter(c.conflicts, s.Conflicts)
		counter(c.recreated, s.Recreated)
		since, _ := p.store.Unpersisted()
		gauge(c.unpersisted, secondsSince(since))
	}
	if mtu := st.PathMTU; mtu != nil {
		for _, p := range mtu.Paths {
			gauge(c.pathMTU, float64(p.MTU), string(p.Family), p.Interface)
		}
		gauge(c.pathMTUNeeded, pathmtu.NeededIPv4, string(pathmtu.IPv4))
		gauge(c.pathMTUNeeded, pathmtu.NeededIPv6, string(pathmtu.IPv6))
		tooSmall := slices.ContainsFunc(mtu.Paths, func(p readyz.Path) bool { return p.TooSmall })
		gauge(c.mtuTooSmall, bit(tooSmall))
		gauge(c.tunnel, bit(mtu.TunnelInTunnel != ""))
	}
	gauge(c.socketsSetting, float64(c.h.cfg.RelayServerSockets))
	if st.Relay.Bound {
		if socks, err := udpsock.List(0, int(c.h.cfg.RelayServerPort)); err == nil {
			var n, drops [2]float64 // by family: IPv4, IPv6
			for _, s := range socks {
				f := 0
				if s.IPv6 {
					f = 1
				}
				n[f]++
				drops[f] += float64(s.Drops)
			}
			for f, family := range []string{"ipv4", "ipv6"} {
				gauge(c.sockets, n[f], family)
				ch <- prometheus.MustNewConstMetric(c.socketDrops, prometheus.CounterValue, drops[f], family)
			}
		}
	}
	gauge(c.buildInfo, 1, c.h.cfg.Version, tsversion.Short(), runtime.Version())
	gauge(c.identity, 1, c.h.cfg.Hostname, id.state, st.DNSName)
}

// secondsSince is the time since t in seconds, 0 for the zero time.
func secondsSince(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return time.Since(t).Seconds()
}

func bit(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// metrics serves GET /metrics: tsrelay's series, Go and process series,
// and Tailscale's user metrics for this node (among them
// tailscaled_peer_relay_forwarded_packets_total and _bytes_total), merged
// into one exposition. The DERP region's series join h.reg in serveNode.
func (h *handlers) metrics() http.Handler {
	h.reg.MustRegister(
		newCollector(h),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	g := prometheus.Gatherers{h.reg, prometheus.GathererFunc(h.tailscaleMetrics)}
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{
		// A failure to read Tailscale's metrics must not hide ours.
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      promLogger{h.logger},
	})
}

// tailscaleMetrics reads Tailscale's user metrics from the node's local API
// and parses them, so that the Gatherers merge them with ours into one
// valid exposition.
func (h *handlers) tailscaleMetrics() ([]*dto.MetricFamily, error) {
	lc := h.parts().node.localClient()
	if lc == nil {
		return nil, nil // not started yet
	}
	ctx, cancel := context.WithTimeout(context.Background(), localAPITimeout)
	defer cancel()
	text, err := lc.UserMetrics(ctx)
	if err != nil {
		return nil, fmt.Errorf("read tailscale user metrics: %w", err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("parse tailscale user metrics: %w", err)
	}
	out := make([]*dto.MetricFamily, 0, len(fams))
	for _, f := range fams {
		out = append(out, f)
	}
	return out, nil
}

// promLogger sends promhttp's errors to the relay's log.
type promLogger struct{ l *slog.Logger }

func (p promLogger) Println(v ...any) { p.l.Warn("metrics", "err", fmt.Sprint(v...)) }
