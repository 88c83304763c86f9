package derpregion

import (
	"context"
	"expvar"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"tailscale.com/derp/derpserver"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/metrics"
)

// statusTimeout bounds the status call one scrape makes to count the peers
// homed here. It is in memory.
const statusTimeout = 3 * time.Second

// derpStats reads derpserver's counters from the expvar set it publishes
// (derpserver.Server.ExpVar), the same numbers cmd/derper exports.
type derpStats struct{ set *metrics.Set }

func newDERPStats(d *derpserver.Server) *derpStats {
	set, _ := d.ExpVar(false).(*metrics.Set)
	return &derpStats{set: set}
}

// int returns the named counter or gauge, 0 if it does not exist.
func (d *derpStats) int(name string) float64 {
	if d == nil || d.set == nil {
		return 0
	}
	if v, ok := d.set.Get(name).(*expvar.Int); ok {
		return float64(v.Value())
	}
	return 0
}

// StatusSource reports the tailnet as the relay's node sees it, to count
// the peers homed on this region. *local.Client satisfies it.
type StatusSource interface {
	Status(ctx context.Context) (*ipnstate.Status, error)
}

// Collector is the DERP region's Prometheus series.
type Collector struct {
	s          *Server
	status     StatusSource // nil: no home-peer count
	regionCode string
	logger     *slog.Logger

	serving, clients, accepts, refused       *prometheus.Desc
	pktsRecv, pktsSent, bytesRecv, bytesSent *prometheus.Desc
	stun, homePeers, certExpiry              *prometheus.Desc
	meshConnected, connsRefused, unadmitted  *prometheus.Desc
}

// NewCollector returns the series for s. With status non-nil it also
// counts the tailnet peers whose home DERP region is regionCode.
func NewCollector(s *Server, status StatusSource, regionCode string, logger *slog.Logger) *Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("tsrelay_derp_"+name, help, labels, nil)
	}
	return &Collector{
		s: s, status: status, regionCode: regionCode, logger: logger,
		serving:       d("serving", "1 when both the DERP (TCP) and the STUN (UDP) server are serving."),
		clients:       d("clients", "DERP clients connected now."),
		accepts:       d("accepts_total", "DERP connections accepted at the TCP level (admitted or not)."),
		refused:       d("clients_refused_total", "DERP clients refused by the tailnet membership check (unknown node key, or the relay's node not Running)."),
		pktsRecv:      d("packets_received_total", "Packets received from DERP clients."),
		pktsSent:      d("packets_sent_total", "Packets forwarded to DERP clients."),
		bytesRecv:     d("received_bytes_total", "Bytes received from DERP clients."),
		bytesSent:     d("sent_bytes_total", "Bytes forwarded to DERP clients."),
		stun:          d("stun_requests_total", "STUN datagrams by outcome (success, not_stun, read_error, write_error).", "disposition"),
		homePeers:     d("home_peers", "Tailnet peers of the relay's node whose home DERP region is this one, as the node sees them."),
		certExpiry:    d("cert_expiry_timestamp_seconds", "When the DERP server's TLS certificate expires (Unix time)."),
		connsRefused:  d("connections_refused_total", "DERP-port connections refused or closed before admission, by reason: accept_rate (over TS_DERP_ACCEPT_RATE), unadmitted_cap (the oldest waiting, closed to make room for a new one over TS_DERP_MAX_UNADMITTED), source_cap (too many waiting from one address), admit_timeout (not admitted within 10 s), not_member (the tailnet membership check).", "reason"),
		unadmitted:    d("unadmitted_connections", "DERP-port connections open now and not yet admitted."),
		meshConnected: d("mesh_peer_connected", "1 while the mesh link to another node of the region answers pings, else 0; one series per mesh peer.", "peer"),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	serving := 0.0
	if c.s.Serving() {
		serving = 1
	}
	gauge(c.serving, serving)
	st := c.s.derpStats()
	gauge(c.clients, st.int("gauge_current_connections"))
	counter(c.accepts, st.int("accepts"))
	counter(c.refused, float64(c.s.refused.Load()))
	for reason, v := range c.s.refusals.snapshot() {
		counter(c.connsRefused, float64(v), reason)
	}
	gauge(c.unadmitted, float64(c.s.derpLn.unadmittedNow()))
	counter(c.pktsRecv, st.int("packets_received"))
	counter(c.pktsSent, st.int("packets_sent"))
	counter(c.bytesRecv, st.int("bytes_received"))
	counter(c.bytesSent, st.int("bytes_sent"))
	for disp, v := range c.s.stun.dispositions() {
		counter(c.stun, v, disp)
	}
	gauge(c.certExpiry, float64(c.s.cfg.TLS.NotAfter().Unix()))
	for _, p := range c.s.MeshPeers() {
		v := 0.0
		if p.Connected {
			v = 1
		}
		gauge(c.meshConnected, v, p.Name)
	}
	if c.status != nil {
		if n, ok := c.countHomePeers(); ok {
			gauge(c.homePeers, float64(n))
		}
	}
}

// countHomePeers counts the peers whose home region is this one.
func (c *Collector) countHomePeers() (int, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
	defer cancel()
	st, err := c.status.Status(ctx)
	if err != nil {
		c.logger.Debug("count DERP home peers", "err", err)
		return 0, false
	}
	n := 0
	for _, p := range st.Peer {
		if p.Relay == c.regionCode {
			n++
		}
	}
	return n, true
}
