// Package lbaddr finds the addresses peers can reach the relay on from its own
// Kubernetes Service: the IPs in the Service's load-balancer status, and the
// addresses its load-balancer hostnames (AWS NLB style) resolve to, each with
// the Service port that leads to the relay's container port. It follows the
// Service as it changes and merges what it finds with addresses configured
// explicitly (TS_RELAY_SERVER_STATIC_ENDPOINTS).
//
// It reads the Service with client-go's dynamic client, listing and watching
// with a field selector that names the one Service, so a Role with "get",
// "list" and "watch" on the Service by resourceNames is enough. The typed
// clients are not used: they link every type in k8s.io/api, megabytes over
// the size budget.
package lbaddr

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// Source says where an Endpoint came from.
type Source string

const (
	// SourceExplicit is an address configured explicitly, in
	// TS_RELAY_SERVER_STATIC_ENDPOINTS.
	SourceExplicit Source = "explicit"
	// SourceService is an IP in the Service's load-balancer status.
	SourceService Source = "service"
	// SourceDNS is an address a load-balancer hostname in the Service's
	// status resolved to.
	SourceDNS Source = "dns"
)

// Endpoint is an address and port peers can send to to reach the relay.
type Endpoint struct {
	AddrPort netip.AddrPort `json:"endpoint"`
	Source   Source         `json:"source"`
}

// String formats e as addr:port(source), e.g. 192.0.2.7:61441(explicit).
func (e Endpoint) String() string { return e.AddrPort.String() + "(" + string(e.Source) + ")" }

// MaxEndpoints caps the merged list: every address is sent to peers in disco
// messages over DERP and probed by them, so a long list costs every peer
// bandwidth and probes for addresses that mostly lead to the same place.
const MaxEndpoints = 16

// defaultResolveInterval is how often load-balancer hostnames are resolved
// again when Config.ResolveInterval is 0. An NLB's addresses change rarely,
// and the last good answer is kept meanwhile.
const defaultResolveInterval = time.Minute

// rbacHint says what the Role must grant; list and watch are what the
// informer needs, and resourceNames works for them only because the
// informer's requests carry a metadata.name field selector.
const rbacHint = `the Role needs "get", "list" and "watch" on the Service %s (resourceNames)`

// Merge returns explicit (always kept, in their given order, source explicit)
// followed by found minus duplicates of anything earlier, the found ones
// sorted by address then port (netip.AddrPort.Compare) so that the same
// inputs always give the same list; it cuts the list at max and returns what
// it cut. When found holds one address twice, the one with Source service is
// kept over dns. IPv4-mapped IPv6 addresses are unmapped and invalid
// addresses skipped. max <= 0 means no limit.
func Merge(explicit []netip.AddrPort, found []Endpoint, max int) (merged, dropped []Endpoint) {
	seen := make(map[netip.AddrPort]bool, len(explicit)+len(found))
	for _, ap := range explicit {
		ap = unmap(ap)
		if !ap.IsValid() || seen[ap] {
			continue
		}
		seen[ap] = true
		merged = append(merged, Endpoint{AddrPort: ap, Source: SourceExplicit})
	}
	for _, e := range sortEndpoints(found) {
		if seen[e.AddrPort] {
			continue
		}
		seen[e.AddrPort] = true
		merged = append(merged, e)
	}
	if max > 0 && len(merged) > max {
		return merged[:max:max], merged[max:]
	}
	return merged, nil
}

// sortEndpoints returns a sorted copy of eps without invalid addresses and
// with one Endpoint per address and port, preferring Source service.
func sortEndpoints(eps []Endpoint) []Endpoint {
	out := make([]Endpoint, 0, len(eps))
	for _, e := range eps {
		if e.AddrPort = unmap(e.AddrPort); e.AddrPort.IsValid() {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b Endpoint) int {
		return cmp.Or(a.AddrPort.Compare(b.AddrPort), cmp.Compare(sourceRank(a.Source), sourceRank(b.Source)))
	})
	return slices.CompactFunc(out, func(a, b Endpoint) bool { return a.AddrPort == b.AddrPort })
}

// sourceRank orders sources when one address has several: an IP the load
// balancer reports beats the same IP found through its hostname.
func sourceRank(s Source) int {
	switch s {
	case SourceExplicit:
		return 0
	case SourceService:
		return 1
	case SourceDNS:
		return 2
	}
	return 3
}

// unmap returns ap with an IPv4-mapped IPv6 address made IPv4, or the zero
// AddrPort if ap is invalid.
func unmap(ap netip.AddrPort) netip.AddrPort {
	if !ap.IsValid() {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Resolver looks up hostnames; *net.Resolver satisfies it. LookupNetIP must
// return when ctx is done.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Config says which Service to follow and what to do with its addresses.
type Config struct {
	// Client reads the Service. A Role limited to the Service by
	// resourceNames must grant "get", "list" and "watch".
	Client dynamic.Interface
	// Namespace is the Service's namespace.
	Namespace string
	// Name is the Service's name.
	Name string
	// RelayPort is the relay's container port (TS_RELAY_SERVER_PORT), and
	// RelayPortName its name in the pod (TS_RELAY_SERVICE_PORT_NAME); ""
	// matches no name. The Service's UDP ports that lead to the relay
	// are, by the first of these rules any of them meets: those whose
	// targetPort is RelayPort (an absent targetPort is the port itself);
	// those whose targetPort is RelayPortName; those named RelayPortName
	// with a named targetPort; the Service's only UDP port, if its
	// targetPort is a name. (A named targetPort cannot be resolved without
	// reading the Pod.) The last two rules are assumptions, logged once.
	RelayPort     uint16
	RelayPortName string
	// Logger receives one line per change; nil discards.
	Logger *slog.Logger
	// Resolver resolves load-balancer hostnames; nil means
	// net.DefaultResolver.
	Resolver Resolver
	// ResolveInterval is how often load-balancer hostnames are resolved
	// again; 0 means 1 minute.
	ResolveInterval time.Duration
	// OnChange is called, from one goroutine, with the full set of
	// endpoints found (sorted, deduplicated, Source service or dns) each
	// time it changes, and once at start after the first sync. When found
	// is empty, why says why in a few words fit for a readiness reason,
	// e.g. `Service kube-public/tsrelay not found`, `Service
	// kube-public/tsrelay has no load-balancer address yet`, `Service
	// kube-public/tsrelay has no port that leads to the relay: want a UDP
	// port with targetPort 61441 or "relay", or named "relay"; it has stun
	// 3478/UDP→stun, derp 8443/TCP→derp`,
	// `load-balancer hostname nlb-x.example resolved to no address: <err>`;
	// "" when found is non-empty. OnChange owns found.
	OnChange func(found []Endpoint, why string)
}

// validate checks the fields Check needs, and those Watch needs too if
// watch is set, and joins what is wrong.
func (c *Config) validate(watch bool) error {
	var errs []error
	if c.Client == nil {
		errs = append(errs, errors.New("no Kubernetes client"))
	}
	if c.Namespace == "" {
		errs = append(errs, errors.New("empty Service namespace"))
	}
	if c.Name == "" {
		errs = append(errs, errors.New("empty Service name"))
	}
	if watch {
		if c.RelayPort == 0 {
			errs = append(errs, errors.New("relay port 0"))
		}
		if c.ResolveInterval < 0 {
			errs = append(errs, fmt.Errorf("negative resolve interval %v", c.ResolveInterval))
		}
		if c.OnChange == nil {
			errs = append(errs, errors.New("no OnChange func"))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("lbaddr config: %w", err)
	}
	return nil
}

// ref names the Service as namespace/name.
func (c *Config) ref() string { return c.Namespace + "/" + c.Name }

// logger returns c.Logger, or one that discards.
func (c *Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

// Check makes one Get of the Service, so a missing RBAC permission shows at
// start: a Forbidden error names the verbs and the Service (e.g. `forbidden
// to "get" services in kube-public; the Role needs "get", "list" and "watch"
// on the Service tsrelay (resourceNames)` wrapping the API error). NotFound is
// not an error (the Service may come later).
func Check(ctx context.Context, cfg Config) error {
	if err := cfg.validate(false); err != nil {
		return err
	}
	_, err := cfg.Client.Resource(servicesResource()).Namespace(cfg.Namespace).Get(ctx, cfg.Name, metav1.GetOptions{})
	switch {
	case err == nil:
		return nil
	case apierrors.IsNotFound(err):
		cfg.logger().Info("relay Service not found yet", "service", cfg.ref())
		return nil
	case apierrors.IsForbidden(err):
		return fmt.Errorf("forbidden to %q services in %s; "+rbacHint+": %w", "get", cfg.Namespace, cfg.Name, err)
	}
	return fmt.Errorf("get Service %s: %w", cfg.ref(), err)
}

// servicesResource names core/v1 Services for the dynamic client.
func servicesResource() schema.GroupVersionResource {
	return schema.GroupVersionResource{Version: "v1", Resource: "services"}
}
