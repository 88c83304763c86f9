package relay

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
	"github.com/tsrelay/tsrelay/lbaddr"
)

// serviceWatch follows the relay's own Service (TS_RELAY_SERVICE) and
// reports the load-balancer addresses it finds as static endpoints. A nil
// *serviceWatch stands for "no Service to follow": its methods do nothing.
type serviceWatch struct {
	cfg lbaddr.Config
}

// newServiceWatch returns the watch of TS_RELAY_SERVICE, which reports
// what it finds to report, or nil without a Service to follow. It reads the
// Service once, so that a Role that does not allow it fails the start (a
// Service that does not exist yet is fine).
func newServiceWatch(ctx context.Context, cfg Config, kc *kubeclient.Client, report func(found []lbaddr.Endpoint, why string), logger *slog.Logger) (*serviceWatch, error) {
	if cfg.RelayService == "" {
		return nil, nil
	}
	w := &serviceWatch{cfg: lbaddr.Config{
		Client:        kc.Dynamic,
		Namespace:     kc.Namespace,
		Name:          cfg.RelayService,
		RelayPort:     uint16(cfg.RelayServerPort),
		RelayPortName: cfg.relayPortName(),
		Logger:        logger,
		OnChange:      report,
	}}
	// Bounded: this runs while the Lease is held, and a hung API server
	// must fail the start rather than stall it.
	ctx, cancel := context.WithTimeout(ctx, serviceCheckTimeout)
	defer cancel()
	if err := lbaddr.Check(ctx, w.cfg); err != nil {
		return nil, fmt.Errorf("follow TS_RELAY_SERVICE=%s: %w", cfg.RelayService, err)
	}
	return w, nil
}

// serviceCheckTimeout bounds newServiceWatch's read of the Service.
const serviceCheckTimeout = 30 * time.Second

// serviceRef names the Service the relay follows as namespace/name, or ""
// for none.
func serviceRef(cfg Config, kc *kubeclient.Client) string {
	if cfg.RelayService == "" {
		return ""
	}
	return kc.Namespace + "/" + cfg.RelayService
}

// run follows the Service until ctx is done.
func (w *serviceWatch) run(ctx context.Context) error {
	if w == nil {
		return nil
	}
	return lbaddr.Watch(ctx, w.cfg)
}
