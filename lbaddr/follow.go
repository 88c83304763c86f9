package lbaddr

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/cache"

	"github.com/tsrelay/tsrelay/internal/chans"
)

// follower keeps the latest copy of one Service with client-go's informer:
// it lists, watches from the list's resourceVersion, resumes when the server
// ends a watch, lists again after "410 Gone", and retries failures with a
// capped, jittered backoff. (It adds little to the binary: client-go's
// REST machinery, which it builds on, is linked anyway.)
type follower struct {
	informer cache.SharedIndexInformer
	name     string
	log      *slog.Logger
	// changed is poked, without blocking, after each change of the copy.
	changed chan<- struct{}
	// synced is closed after the first full read of the Service.
	synced chan struct{}
	// failing is set while reading the Service fails, so that a streak of
	// failures logs one warning.
	failing atomic.Bool
}

// newFollower returns a follower of Service name in namespace that logs to
// log and pokes changed; start it with run.
func newFollower(client dynamic.Interface, namespace, name string, log *slog.Logger, changed chan<- struct{}) *follower {
	f := &follower{name: name, log: log, changed: changed, synced: make(chan struct{})}
	services := client.Resource(servicesResource()).Namespace(namespace)
	// The field selector is what lets a Role limited to the Service by
	// resourceNames allow list and watch.
	selector := fields.OneTermEqualSelector("metadata.name", name).String()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			opts.FieldSelector = selector
			return services.List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.FieldSelector = selector
			w, err := services.Watch(ctx, opts)
			if err == nil && f.failing.CompareAndSwap(true, false) {
				// Only a watch ends a streak: with a Role that allows
				// list but not watch, every retry lists fine.
				f.log.Info("reading the Service works again")
			}
			return w, err
		},
	}
	// The wrapper tells the informer when client cannot stream the initial
	// list through a watch (the fake client in tests).
	f.informer = cache.NewSharedIndexInformerWithOptions(cache.ToListWatcherWithWatchListSemantics(lw, client),
		&unstructured.Unstructured{}, cache.SharedIndexInformerOptions{})
	// A change pending already is folded in: the reader takes the latest.
	poke := func() { chans.Poke(f.changed) }
	f.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { poke() },
		UpdateFunc: func(any, any) { poke() },
		DeleteFunc: func(any) { poke() },
	})
	// Instead of client-go's default, which logs every failure through klog.
	f.informer.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		f.readError(err)
	})
	return f
}

// run follows the Service until ctx is done. After the first full read it
// pokes changed even if there is no Service (which no handler reports), and
// closes synced.
func (f *follower) run(ctx context.Context) {
	go func() {
		if !cache.WaitForCacheSync(ctx.Done(), f.informer.HasSynced) {
			return
		}
		close(f.synced)
		chans.Poke(f.changed)
	}()
	f.informer.RunWithContext(ctx)
}

// current returns the Service as last seen, or nil if it does not exist.
// Callers must not modify it.
func (f *follower) current() *unstructured.Unstructured {
	for _, obj := range f.informer.GetStore().List() {
		if svc, ok := obj.(*unstructured.Unstructured); ok && svc.GetName() == f.name {
			return svc
		}
	}
	return nil
}

// readError logs a failure to list or watch the Service, which the informer
// retries with backoff: a warning for the first of a streak, debug lines
// after it. An expired resourceVersion is routine: the informer lists again.
func (f *follower) readError(err error) {
	if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
		f.log.Debug("Service watch expired; listing again", "err", err)
		return
	}
	if !f.failing.CompareAndSwap(false, true) {
		f.log.Debug("reading the Service still fails; retrying", "err", err)
		return
	}
	if apierrors.IsForbidden(err) {
		f.log.Warn("forbidden to read the Service; retrying", "err", err, "hint", fmt.Sprintf(rbacHint, f.name))
		return
	}
	f.log.Warn("reading the Service failed; retrying", "err", err)
}
