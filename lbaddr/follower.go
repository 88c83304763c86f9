package lbaddr

import (
	"context"
	"log/slog"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
)

// ServiceFollower keeps the latest copy of one Service, as Watch does for
// the relay's own: for callers that read other fields of it (the DERP
// mesh's members). It needs get, list and watch on the Service by name.
type ServiceFollower struct{ f *follower }

// FollowService returns a follower of Service name in namespace that logs
// to log and pokes changed, without blocking, after each change and after
// the first full read; start it with Run.
func FollowService(client dynamic.Interface, namespace, name string, log *slog.Logger, changed chan<- struct{}) *ServiceFollower {
	return &ServiceFollower{f: newFollower(client, namespace, name, log, changed)}
}

// Run follows the Service until ctx is done.
func (s *ServiceFollower) Run(ctx context.Context) { s.f.run(ctx) }

// Current returns the Service as last seen, or nil if it does not exist
// (or was not read yet). Callers must not modify it.
func (s *ServiceFollower) Current() *unstructured.Unstructured { return s.f.current() }
