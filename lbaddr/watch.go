package lbaddr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// resolveTimeout bounds one round of hostname lookups. The watcher keeps
// following the Service meanwhile; only a first answer for a new hostname is
// waited for before reporting.
const resolveTimeout = 10 * time.Second

// Watch follows the Service until ctx is done and calls cfg.OnChange. It
// returns nil when ctx ends, and an error only for bad config.
//
// Errors reading the Service (a missing RBAC permission, an unreachable API
// server) are retried with backoff and logged, one warning per streak; use
// Check at start to fail fast on them. OnChange is first called once the
// Service has been read.
func Watch(ctx context.Context, cfg Config) error {
	if err := cfg.validate(true); err != nil {
		return err
	}
	if cfg.Resolver == nil {
		cfg.Resolver = net.DefaultResolver
	}
	if cfg.ResolveInterval == 0 {
		cfg.ResolveInterval = defaultResolveInterval
	}
	w := &watcher{
		cfg:     cfg,
		log:     cfg.logger().With("service", cfg.ref()),
		changed: make(chan struct{}, 1),
		results: make(chan map[string]lookup, 1),
		addrs:   make(map[string][]netip.Addr),
		failed:  make(map[string]error),
	}
	w.follower = newFollower(cfg.Client, cfg.Namespace, cfg.Name, w.log, w.changed)

	var wg sync.WaitGroup
	wg.Go(func() { w.follower.run(ctx) })
	w.run(ctx, w.follower.synced, &wg)
	wg.Wait()
	return nil
}

// lookup is the answer for one hostname.
type lookup struct {
	addrs []netip.Addr // sorted, unmapped; non-empty when err is nil
	err   error
}

// watcher is the state of one Watch. The fields from svc on are owned by
// the goroutine in run.
type watcher struct {
	cfg      Config
	log      *slog.Logger
	follower *follower              // reads the Service
	changed  chan struct{}          // poked when the follower's copy changed
	results  chan map[string]lookup // a resolve round finished

	svc    serviceInfo
	addrs  map[string][]netip.Addr // last good answer per current hostname
	failed map[string]error        // last error per hostname failing now
	notes  string                  // serviceInfo.notes last logged

	resolving   bool // a resolve round is in flight
	resolveMore bool // start another round when it ends

	reported bool // OnChange was called
	last     []Endpoint
	lastWhy  string
}

// run is the watcher's one goroutine: it waits for the Service's first
// read, then recomputes the endpoints whenever the Service changes or a
// resolve round ends, and re-resolves hostnames every ResolveInterval.
func (w *watcher) run(ctx context.Context, synced <-chan struct{}, wg *sync.WaitGroup) {
	select {
	case <-ctx.Done():
		return
	case <-synced:
	}
	ticker := time.NewTicker(w.cfg.ResolveInterval)
	defer ticker.Stop()
	w.refresh(ctx, wg)
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.changed:
			w.refresh(ctx, wg)
		case <-ticker.C:
			w.resolve(ctx, wg)
		case res := <-w.results:
			w.resolving = false
			w.applyLookups(res)
			if w.resolveMore {
				w.resolveMore = false
				w.resolve(ctx, wg)
			}
			w.report()
		}
	}
}

// refresh reads the follower's copy of the Service and reports what changed,
// first resolving hostnames never tried before.
func (w *watcher) refresh(ctx context.Context, wg *sync.WaitGroup) {
	if svc := w.follower.current(); svc != nil {
		w.svc = parseService(svc, relayTarget{number: w.cfg.RelayPort, name: w.cfg.RelayPortName})
	} else {
		w.svc = serviceInfo{why: fmt.Sprintf("Service %s not found", w.cfg.ref())}
	}
	w.logNotes()

	current := w.svc.hostnames()
	for host := range w.addrs {
		if !slices.Contains(current, host) {
			delete(w.addrs, host)
		}
	}
	for host := range w.failed {
		if !slices.Contains(current, host) {
			delete(w.failed, host)
		}
	}
	if len(w.untried()) > 0 {
		w.resolve(ctx, wg)
	}
	w.report()
}

// logNotes logs what parseService found wrong or assumed, once for each
// distinct finding.
func (w *watcher) logNotes() {
	notes := w.svc.notes()
	if notes == w.notes {
		return
	}
	w.notes = notes
	for _, ip := range w.svc.badIPs {
		w.log.Warn("skipping unparsable load-balancer IP in Service status", "ip", ip)
	}
	if w.svc.assumed != "" {
		w.log.Info("no Service port has the relay's port or port name as targetPort; assuming this one leads to it",
			"port", w.svc.assumed, "relay_port", w.cfg.RelayPort, "relay_port_name", w.cfg.RelayPortName)
	}
}

// untried returns the current hostnames that were never resolved, well or
// badly.
func (w *watcher) untried() []string {
	var hosts []string
	for _, host := range w.svc.hostnames() {
		if _, ok := w.addrs[host]; ok {
			continue
		}
		if _, ok := w.failed[host]; ok {
			continue
		}
		hosts = append(hosts, host)
	}
	return hosts
}

// resolve starts a round of lookups of the current hostnames, or asks for
// one after the round in flight.
func (w *watcher) resolve(ctx context.Context, wg *sync.WaitGroup) {
	hosts := w.svc.hostnames()
	if len(hosts) == 0 {
		return
	}
	if w.resolving {
		w.resolveMore = true
		return
	}
	w.resolving = true
	resolver := w.cfg.Resolver
	wg.Go(func() {
		// results has room for the one round in flight, so this send
		// never blocks, even after ctx is done and run has returned.
		w.results <- lookupAll(ctx, resolver, hosts)
	})
}

// lookupAll resolves hosts to A and AAAA addresses, in parallel.
func lookupAll(ctx context.Context, r Resolver, hosts []string) map[string]lookup {
	ctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	var mu sync.Mutex
	var wg sync.WaitGroup
	res := make(map[string]lookup, len(hosts))
	for _, host := range hosts {
		wg.Go(func() {
			l := lookupHost(ctx, r, host)
			mu.Lock()
			res[host] = l
			mu.Unlock()
		})
	}
	wg.Wait()
	return res
}

// lookupHost resolves host, and counts an empty answer as a failure.
func lookupHost(ctx context.Context, r Resolver, host string) lookup {
	addrs, err := r.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return lookup{err: err}
	}
	var out []netip.Addr
	for _, a := range addrs {
		// net.Resolver gives IPv4 addresses as IPv4-mapped IPv6 ones.
		if a = a.Unmap(); a.IsValid() && a.Zone() == "" {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return lookup{err: errors.New("no A or AAAA records")}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return lookup{addrs: slices.Compact(out)}
}

// applyLookups keeps each successful answer and, for a failed lookup, the
// last good answer, warning once per failure streak.
func (w *watcher) applyLookups(res map[string]lookup) {
	current := w.svc.hostnames()
	for host, l := range res {
		if !slices.Contains(current, host) {
			continue // gone from the Service meanwhile
		}
		if l.err == nil {
			if _, failing := w.failed[host]; failing {
				w.log.Info("load-balancer hostname resolves again", "hostname", host, "addrs", l.addrs)
				delete(w.failed, host)
			}
			w.addrs[host] = l.addrs
			continue
		}
		if _, failing := w.failed[host]; !failing {
			if last := w.addrs[host]; len(last) > 0 {
				w.log.Warn("resolve load-balancer hostname failed; keeping the last answer",
					"hostname", host, "last_answer", last, "err", l.err)
			} else {
				w.log.Warn("resolve load-balancer hostname failed", "hostname", host, "err", l.err)
			}
		}
		w.failed[host] = l.err
	}
}

// report calls OnChange if the endpoints or, when there are none, the
// reason differ from the last call. It waits while a hostname has not been
// tried yet, so that a Service switching to a hostname does not flap through
// an empty set.
func (w *watcher) report() {
	if len(w.untried()) > 0 {
		return
	}
	found := w.found()
	why := ""
	if len(found) == 0 {
		why = w.whyEmpty()
	}
	if w.reported && slices.Equal(found, w.last) && why == w.lastWhy {
		return
	}
	w.reported, w.last, w.lastWhy = true, found, why
	if why != "" {
		w.log.Info("no load-balancer endpoints", "why", why)
	} else {
		w.log.Info("load-balancer endpoints", "endpoints", endpointStrings(found))
	}
	w.cfg.OnChange(slices.Clone(found), why)
}

// found returns the endpoints from the Service's IPs and its hostnames' last
// good answers, sorted and deduplicated.
func (w *watcher) found() []Endpoint {
	var eps []Endpoint
	for _, ap := range w.svc.ips {
		eps = append(eps, Endpoint{AddrPort: ap, Source: SourceService})
	}
	for _, hp := range w.svc.hosts {
		for _, a := range w.addrs[hp.Host] {
			eps = append(eps, Endpoint{AddrPort: netip.AddrPortFrom(a, hp.Port), Source: SourceDNS})
		}
	}
	return sortEndpoints(eps)
}

// whyEmpty says why found is empty.
func (w *watcher) whyEmpty() string {
	if w.svc.why != "" {
		return w.svc.why
	}
	for _, host := range w.svc.hostnames() {
		if err := w.failed[host]; err != nil {
			return fmt.Sprintf("load-balancer hostname %s resolved to no address: %v", host, err)
		}
	}
	return fmt.Sprintf("Service %s has no load-balancer address it can use", w.cfg.ref())
}

// endpointStrings formats eps for logs with Endpoint.String, e.g.
// "192.0.2.10:41000(service)".
func endpointStrings(eps []Endpoint) []string {
	out := make([]string, len(eps))
	for i, e := range eps {
		out[i] = e.String()
	}
	return out
}
