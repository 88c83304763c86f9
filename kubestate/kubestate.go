// Package kubestate is an ipn.StateStore that keeps tailscaled's state (node
// and machine keys, login profiles) in one Kubernetes Secret, so a relay pod
// keeps its identity across restarts without a volume.
//
// It follows Tailscale's ipn/store/kubestore and differs where that one is
// weak: reads are served from an in-memory copy loaded at start; writes are
// Updates carrying the last seen resourceVersion, retried on conflict against
// a fresh copy so keys written by others survive; a failed write is an error
// for the caller and is counted in Stats, never dropped; state keys are
// encoded reversibly into Secret keys (see encodeKey); and no Event is
// emitted per write.
//
// A write that fails because the API server is away stays pending: reads
// return it (it is what tailscaled believes), every later write carries it,
// and Run writes it again in the background, with backoff, until the Secret
// holds it; Unpersisted says since when the Secret has lagged. Tailscale
// logs a failed write and carries on, and rewrites a key only when its value
// changes again, so without this a restart after an API-server outage could
// lose the node key written during it. Flush tries once more on shutdown.
// Only a write the API server could never accept (over the Secret size
// limit) is dropped, with an error.
//
// It talks to the API server with client-go's dynamic client: the typed
// client links all of k8s.io/api, which would take the binary over its size
// budget.
package kubestate

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/util/retry"
	"tailscale.com/ipn"
)

const (
	// managedByLabel marks a Secret that New created.
	managedByLabel = "app.kubernetes.io/managed-by"
	managedByValue = "tsrelay"

	// fieldManager names tsrelay in the Secret's managedFields.
	fieldManager = "tsrelay"

	// startTimeout bounds the API calls New makes (get, maybe create, and
	// the update-permission check), in addition to the caller's ctx, so
	// that an unreachable API server fails the start instead of hanging it.
	startTimeout = 30 * time.Second

	// retryMin and retryMax bound the pause between background rewrites
	// of pending state: the first comes a second after a failure, so a
	// blink of the API server costs a second, and the pause doubles to
	// half a minute so a long outage costs a request per 30 s.
	retryMin = time.Second
	retryMax = 30 * time.Second

	// writeTimeout bounds one WriteState call, conflict retries included.
	// WriteState has no context and tailscaled calls it with its backend
	// lock held, so a hung API server must not stall tailscaled for long;
	// after this the caller gets an error and Stats counts a failure.
	writeTimeout = 10 * time.Second

	// conflictAttempts is how many Updates one write tries before giving
	// up on conflicts. Only a second writer causes them (tsrelay runs one
	// pod per Secret, but a rollout can overlap two for a moment). Against
	// a real API server two stores writing flat out needed up to 5
	// attempts with lock-stepped retries; jittered retries and this many
	// attempts make that case succeed, and writeTimeout still bounds it.
	conflictAttempts = 12

	// maxSecretSize is the API server's limit on the total bytes of a
	// Secret's values (MaxSecretSize in k8s.io/api/core/v1, not imported:
	// that package links every core/v1 type).
	maxSecretSize = 1 << 20

	// The Role must grant these on the Secret; create is needed only when
	// the Secret does not exist yet (RBAC cannot limit create by name).
	rbacHint = `the Role needs verbs "get" and "update" on this Secret, and "create" on secrets unless the Secret already exists`
)

// Stats counts what a Store did since it was created, for metrics.
type Stats struct {
	// Writes is the number of state writes the API server accepted. Writes
	// of unchanged values make no API call and are not counted.
	Writes uint64
	// Failures is the number of WriteState calls that returned an error.
	Failures uint64
	// Conflicts is the number of Updates the API server rejected because
	// someone else had changed the Secret since we last read it.
	Conflicts uint64
	// Retries is the number of background rewrites of pending state
	// that failed.
	Retries uint64
	// Recreated is the number of times the Secret was found deleted and
	// created again from memory.
	Recreated uint64
}

// pendingValue is a change the Secret does not hold yet: a value, or a
// deletion.
type pendingValue struct {
	value   []byte
	deleted bool
}

// Store is an ipn.StateStore kept in one Kubernetes Secret. It is safe for
// concurrent use.
type Store struct {
	client    dynamic.ResourceInterface // secrets in namespace
	logger    *slog.Logger
	namespace string
	name      string

	// writeMu serialises writes; it is held across API calls.
	writeMu sync.Mutex
	// secret is the Secret as last returned by the API server, foreign
	// keys included. Guarded by writeMu.
	secret *unstructured.Unstructured

	// pending holds the writes the Secret does not reflect yet, by
	// Secret key; since is when it last went from empty to not. Guarded
	// by writeMu.
	pending map[string]pendingValue
	since   time.Time

	// memMu guards mem, which is decoded from secret with pending laid
	// over it, and copies of since and len(pending). Reads take only
	// memMu, so they never wait on the API server.
	memMu       sync.RWMutex
	mem         map[ipn.StateKey][]byte
	unpersisted time.Time
	pendingKeys int

	// kick wakes Run when a write leaves state pending.
	kick chan struct{}
	// retryMin is the first pause of Run's backoff (retryMin; tests
	// shorten it).
	retryMin time.Duration

	// onRecreated, if set, is called after the Secret was re-created.
	onRecreated func(keys int)
	// mayWrite, if set, is asked before each write to the API server.
	mayWrite func() bool

	writes, failures, conflicts, retries, recreated atomic.Uint64
}

var _ ipn.StateStore = (*Store)(nil)

// New returns a Store for Secret name in namespace, using client (see
// internal/kubeclient). It loads the Secret, creating it if missing, and
// checks that it may update it, so that a missing RBAC verb shows at start;
// ctx bounds that work.
func New(ctx context.Context, logger *slog.Logger, client dynamic.Interface, namespace, name string) (*Store, error) {
	if name == "" {
		return nil, errors.New("kube state: empty secret name")
	}
	return newStore(ctx, logger, client.Resource(secretsResource()).Namespace(namespace), namespace, name)
}

// newStore returns a Store for Secret name, using client, which must be
// namespaced to secrets in namespace. Tests pass a dynamic/fake client.
func newStore(ctx context.Context, logger *slog.Logger, client dynamic.ResourceInterface, namespace, name string) (*Store, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Store{
		client:    client,
		logger:    logger,
		namespace: namespace,
		name:      name,
		pending:   map[string]pendingValue{},
		kick:      make(chan struct{}, 1),
		retryMin:  retryMin,
	}
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()

	obj, created, err := s.getOrCreate(ctx)
	if err != nil {
		return nil, fmt.Errorf("kube state secret %s: %w", s.Ref(), err)
	}
	foreign, err := s.adopt(obj)
	if err != nil {
		return nil, fmt.Errorf("kube state secret %s: load: %w", s.Ref(), err)
	}
	// Prove the update permission with an Update that changes nothing, so
	// that a Role without it fails here and not at the first login, when
	// losing the write would lose the new node key.
	if err := s.commit(ctx, nil); err != nil {
		return nil, fmt.Errorf("kube state secret %s: check update permission: %w", s.Ref(), err)
	}
	s.memMu.RLock()
	keys, size := len(s.mem), 0
	for _, v := range s.mem {
		size += len(v)
	}
	s.memMu.RUnlock()
	s.logger.Info("kube state loaded", "secret", s.Ref(), "created", created,
		"keys", keys, "bytes", size, "foreign_keys", foreign)
	return s, nil
}

// String returns "kube:<namespace>/<name>".
func (s *Store) String() string { return "kube:" + s.Ref() }

// Ref returns the Secret as "<namespace>/<name>", the form people read in
// Events, logs, /readyz and metric labels.
func (s *Store) Ref() string { return s.namespace + "/" + s.name }

// Stats returns the Store's counters.
func (s *Store) Stats() Stats {
	return Stats{
		Writes:    s.writes.Load(),
		Failures:  s.failures.Load(),
		Conflicts: s.conflicts.Load(),
		Retries:   s.retries.Load(),
		Recreated: s.recreated.Load(),
	}
}

// Unpersisted returns since when the Secret has lacked writes the Store
// accepted (zero when it holds them all) and how many keys are pending.
func (s *Store) Unpersisted() (since time.Time, keys int) {
	s.memMu.RLock()
	defer s.memMu.RUnlock()
	return s.unpersisted, s.pendingKeys
}

// ReadState returns the value of id from memory (the Secret as loaded at
// start and after each write, with pending writes laid over it), or
// ipn.ErrStateNotExist.
func (s *Store) ReadState(id ipn.StateKey) ([]byte, error) {
	s.memMu.RLock()
	defer s.memMu.RUnlock()
	bs, ok := s.mem[id]
	if !ok {
		return nil, ipn.ErrStateNotExist
	}
	return bytes.Clone(bs), nil
}

// WriteState stores bs under id in the Secret, or deletes id if bs is nil,
// and returns once the API server has accepted the change. Writing the value
// already stored makes no API call. Keys others wrote to the Secret are
// kept. The call is bounded by writeTimeout (10s). If it fails, the change
// stays pending (reads return it, Run writes it again later) and the error
// says so; a change over the Secret size limit is dropped instead.
func (s *Store) WriteState(id ipn.StateKey, bs []byte) error {
	if err := s.writeState(id, bs); err != nil {
		s.failures.Add(1)
		// Only the key name and the size: values hold private keys.
		s.logger.Warn("kube state write failed", "secret", s.Ref(), "key", string(id), "bytes", len(bs), "err", err)
		return fmt.Errorf("kube state secret %s: write key %q (%d bytes): %w", s.Ref(), id, len(bs), err)
	}
	return nil
}

func (s *Store) writeState(id ipn.StateKey, bs []byte) error {
	key, err := encodeKey(id)
	if err != nil {
		return err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if s.unchanged(id, bs) {
		return nil
	}
	prev, hadPrev := s.pending[key]
	s.pending[key] = pendingValue{value: bytes.Clone(bs), deleted: bs == nil}
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	err = s.commitPending(ctx)
	if errors.Is(err, errTooLarge) {
		// Never acceptable: keep it from blocking every later write.
		if hadPrev {
			s.pending[key] = prev
		} else {
			delete(s.pending, key)
		}
		s.syncMem()
		return err
	}
	if err != nil {
		s.markPending()
		return fmt.Errorf("%w (kept in memory; written again in the background)", err)
	}
	s.writes.Add(1)
	s.logger.Debug("kube state written", "secret", s.Ref(), "key", string(id), "bytes", len(bs), "deleted", bs == nil)
	return nil
}

// unchanged reports whether writing bs to id would change nothing.
func (s *Store) unchanged(id ipn.StateKey, bs []byte) bool {
	s.memMu.RLock()
	defer s.memMu.RUnlock()
	old, ok := s.mem[id]
	if bs == nil {
		return !ok
	}
	return ok && bytes.Equal(old, bs)
}

// commitPending writes every pending change to the Secret. On success
// pending is empty; either way memory shows the Secret with what is still
// pending laid over it. Callers hold writeMu.
func (s *Store) commitPending(ctx context.Context) error {
	err := s.commit(ctx, func(data map[string][]byte) {
		for k, p := range s.pending {
			if p.deleted {
				delete(data, k)
			} else {
				data[k] = p.value
			}
		}
	})
	if errors.Is(err, errGone) {
		// Deleted under us: no outage to wait out, and memory holds
		// the whole state, the change included.
		err = s.recreate(ctx, "a write found it gone")
	}
	if err == nil {
		clear(s.pending)
		if !s.since.IsZero() {
			s.logger.Info("kube state caught up: the secret holds every write again", "secret", s.Ref(),
				"unpersisted_for", time.Since(s.since).Round(time.Millisecond))
			s.since = time.Time{}
		}
	}
	s.syncMem()
	return err
}

// markPending notes that the Secret lags memory, and wakes Run. Callers
// hold writeMu.
func (s *Store) markPending() {
	if s.since.IsZero() {
		s.since = time.Now()
		s.logger.Warn("kube state not persisted; will write it again when the API server answers",
			"secret", s.Ref(), "keys", len(s.pending))
	}
	s.syncMem()
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// syncMem rebuilds memory from the last seen Secret and pending. Callers
// hold writeMu, or own s exclusively.
func (s *Store) syncMem() {
	data, err := secretData(s.secret)
	if err != nil {
		// adopt decoded this Secret before; it cannot fail now.
		data = map[string][]byte{}
	}
	for k, p := range s.pending {
		if p.deleted {
			delete(data, k)
		} else {
			data[k] = p.value
		}
	}
	mem := make(map[ipn.StateKey][]byte, len(data))
	for k, v := range data {
		if id, ok := decodeKey(k); ok {
			mem[id] = v
		}
	}
	s.memMu.Lock()
	s.mem = mem
	s.unpersisted = s.since
	s.pendingKeys = len(s.pending)
	s.memMu.Unlock()
}

// Run writes pending state again in the background until ctx is done: a
// second after a write fails, then with backoff doubling to 30 s, until the
// Secret holds it. It returns nil when ctx is done; call Flush afterwards
// for a last try.
func (s *Store) Run(ctx context.Context) error {
	pause := s.retryMin
	for {
		s.writeMu.Lock()
		n := len(s.pending)
		s.writeMu.Unlock()
		var wait <-chan time.Time
		if n > 0 {
			wait = time.After(pause)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
			continue // pending may have just filled: look again
		case <-wait:
		}
		if err := s.retryPending(ctx); err != nil {
			s.retries.Add(1)
			s.logger.Debug("kube state rewrite failed", "secret", s.Ref(), "err", err, "next", pause)
			pause = min(pause*2, retryMax)
			continue
		}
		pause = s.retryMin
	}
}

// retryPending writes pending state, if any, once.
func (s *Store) retryPending(ctx context.Context) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if len(s.pending) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, writeTimeout)
	defer cancel()
	return s.commitPending(ctx)
}

// Flush writes pending state once, bounded by ctx: the last try on
// shutdown. It returns nil when nothing is pending, and otherwise an error
// saying how many keys a restart would lose.
func (s *Store) Flush(ctx context.Context) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	n := len(s.pending)
	if n == 0 {
		return nil
	}
	if err := s.commitPending(ctx); err != nil {
		return fmt.Errorf("kube state secret %s: last write of %d pending keys failed; a restart now may lose the node identity: %w", s.Ref(), n, err)
	}
	return nil
}

// getOrCreate returns the Secret, creating it empty if it does not exist.
func (s *Store) getOrCreate(ctx context.Context) (obj *unstructured.Unstructured, created bool, err error) {
	obj, err = s.client.Get(ctx, s.name, metav1.GetOptions{})
	if err == nil {
		return obj, false, nil
	}
	if !apierrors.IsNotFound(err) {
		return nil, false, s.apiError("get", err)
	}
	obj, err = s.client.Create(ctx, s.newSecret(), metav1.CreateOptions{FieldManager: fieldManager})
	if apierrors.IsAlreadyExists(err) {
		// Someone created it between our get and create: use theirs.
		if obj, err = s.client.Get(ctx, s.name, metav1.GetOptions{}); err != nil {
			return nil, false, s.apiError("get", err)
		}
		return obj, false, nil
	}
	if err != nil {
		return nil, false, s.apiError("create", err)
	}
	s.logger.Info("kube state secret created", "secret", s.Ref())
	return obj, true, nil
}

func (s *Store) newSecret() *unstructured.Unstructured {
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1",
		"kind":       "Secret",
		"type":       "Opaque",
	}}
	obj.SetNamespace(s.namespace)
	obj.SetName(s.name)
	obj.SetLabels(map[string]string{managedByLabel: managedByValue})
	return obj
}

// commit applies change (nil: none) to the Secret's data and Updates it with
// the resourceVersion last seen. On a conflict it reads the Secret again and
// re-applies change to that copy, so what others wrote meanwhile is kept.
// On success memory follows the Secret as returned. Callers hold writeMu,
// or own s exclusively (newStore).
func (s *Store) commit(ctx context.Context, change func(data map[string][]byte)) error {
	if s.mayWrite != nil && !s.mayWrite() {
		return errFenced
	}
	// Short, fully jittered pauses between attempts: each attempt starts
	// from a fresh GET, and the jitter keeps two writers from retrying in
	// lock step and colliding again.
	backoff := wait.Backoff{Steps: conflictAttempts, Duration: 10 * time.Millisecond, Factor: 1.5, Jitter: 1}
	base := s.secret
	attempt := 0
	err := retry.RetryOnConflict(backoff, func() error {
		if attempt++; attempt > 1 {
			fresh, err := s.client.Get(ctx, s.name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("get: %w: %w", errGone, err)
			}
			if err != nil {
				return s.apiError("get", err)
			}
			base = fresh
		}
		data, err := secretData(base)
		if err != nil {
			return err
		}
		if change != nil {
			change(data)
		}
		if size := dataSize(data); size > maxSecretSize {
			return fmt.Errorf("secret data would be %d bytes, %w of %d bytes per Secret", size, errTooLarge, maxSecretSize)
		}
		next := base.DeepCopy()
		if err := setSecretData(next, data); err != nil {
			return err
		}
		updated, err := s.client.Update(ctx, next, metav1.UpdateOptions{FieldManager: fieldManager})
		if apierrors.IsConflict(err) {
			s.conflicts.Add(1)
			s.logger.Info("kube state secret changed by someone else; retrying on a fresh copy",
				"secret", s.Ref(), "attempt", attempt)
			return err
		}
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("update: %w: %w", errGone, err)
		}
		if err != nil {
			return s.apiError("update", err)
		}
		_, err = s.adopt(updated)
		return err
	})
	if apierrors.IsConflict(err) {
		return fmt.Errorf("update: gave up after %d conflicts: %w", attempt, err)
	}
	return err
}

// errTooLarge is the Secret size limit, which no retry can get past.
var errTooLarge = errors.New("over the Kubernetes limit")

// errFenced is a write the Store's owner no longer allows (SetWriteGuard).
var errFenced = errors.New("not written: this process may no longer write the node state (its Lease is lost)")

// SetWriteGuard makes every later write to the API server (WriteState, the
// background rewrites, Flush, re-creating a deleted Secret) ask may first;
// when it says no, nothing is sent and the change stays in memory only.
// The relay passes "this process still holds the Lease": once it is lost,
// another process may own the Secret, and stale keys must not land there.
// Callers hold no lock; call it before the Store is shared.
func (s *Store) SetWriteGuard(may func() bool) {
	s.writeMu.Lock()
	s.mayWrite = may
	s.writeMu.Unlock()
}

// errGone is a Secret deleted while the Store runs.
var errGone = errors.New("the secret was deleted")

// adopt makes obj the last seen Secret and reloads memory from it and
// pending. It returns the Secret keys that are not state keys.
func (s *Store) adopt(obj *unstructured.Unstructured) (foreign []string, err error) {
	data, err := secretData(obj)
	if err != nil {
		return nil, err
	}
	for k := range data {
		if _, ok := decodeKey(k); !ok {
			foreign = append(foreign, k)
		}
	}
	s.secret = obj
	s.syncMem()
	return foreign, nil
}

// apiError describes err from an API call with verb, and says which RBAC
// verbs are needed when the call was forbidden.
func (s *Store) apiError(verb string, err error) error {
	if apierrors.IsForbidden(err) {
		return fmt.Errorf("forbidden to %q secrets; %s: %w", verb, rbacHint, err)
	}
	return fmt.Errorf("%s: %w", verb, err)
}

// secretsResource names core/v1 Secrets for the dynamic client.
func secretsResource() schema.GroupVersionResource {
	return schema.GroupVersionResource{Version: "v1", Resource: "secrets"}
}

// secretData returns the decoded data of a Secret, all keys included.
func secretData(obj *unstructured.Unstructured) (map[string][]byte, error) {
	raw, _, err := unstructured.NestedStringMap(obj.Object, "data")
	if err != nil {
		return nil, fmt.Errorf("read secret data: %w", err)
	}
	data := make(map[string][]byte, len(raw)+1)
	for k, v := range raw {
		b, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			return nil, fmt.Errorf("decode secret key %q: %w", k, err)
		}
		data[k] = b
	}
	return data, nil
}

// setSecretData replaces the data of a Secret.
func setSecretData(obj *unstructured.Unstructured, data map[string][]byte) error {
	raw := make(map[string]string, len(data))
	for k, v := range data {
		raw[k] = base64.StdEncoding.EncodeToString(v)
	}
	if err := unstructured.SetNestedStringMap(obj.Object, raw, "data"); err != nil {
		return fmt.Errorf("set secret data: %w", err)
	}
	return nil
}

// dataSize is what the API server checks against maxSecretSize: the total
// bytes of the values.
func dataSize(data map[string][]byte) int {
	n := 0
	for _, v := range data {
		n += len(v)
	}
	return n
}
