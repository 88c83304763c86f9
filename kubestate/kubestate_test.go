package kubestate

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	clienttesting "k8s.io/client-go/testing"
	"tailscale.com/ipn"

	"github.com/tsrelay/tsrelay/internal/kubeclient"
)

const (
	testNamespace = "kube-public"
	testName      = "tsrelay-state"
)

// fakeAPI is a dynamic/fake client that also does what the API server does
// with resourceVersions: sets a new one on every create and update, and
// rejects an update whose resourceVersion is not the stored one.
type fakeAPI struct {
	client  *dynamicfake.FakeDynamicClient
	secrets dynamic.ResourceInterface

	mu sync.Mutex // guards rv and read-modify-write of the tracker
	rv int
}

// newFakeAPI returns a fake API server holding a Secret testName with data
// (base64-encoded here), or no Secret if data is nil.
func newFakeAPI(t *testing.T, data map[string]string) *fakeAPI {
	t.Helper()
	var objs []runtime.Object
	if data != nil {
		obj := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Secret"}}
		obj.SetNamespace(testNamespace)
		obj.SetName(testName)
		obj.SetResourceVersion("1")
		raw := make(map[string]string, len(data))
		for k, v := range data {
			raw[k] = base64.StdEncoding.EncodeToString([]byte(v))
		}
		if err := unstructured.SetNestedStringMap(obj.Object, raw, "data"); err != nil {
			t.Fatal(err)
		}
		objs = append(objs, obj)
	}
	f := &fakeAPI{client: dynamicfake.NewSimpleDynamicClient(runtime.NewScheme(), objs...), rv: 1}
	f.secrets = f.client.Resource(secretsResource()).Namespace(testNamespace)
	tracker := f.client.Tracker()
	f.client.PrependReactor("create", "secrets", func(a clienttesting.Action) (bool, runtime.Object, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		obj := a.(clienttesting.CreateAction).GetObject().(*unstructured.Unstructured).DeepCopy()
		obj.SetResourceVersion(f.nextRV())
		if err := tracker.Create(secretsResource(), obj, a.GetNamespace()); err != nil {
			return true, nil, err
		}
		return true, obj.DeepCopy(), nil
	})
	f.client.PrependReactor("update", "secrets", func(a clienttesting.Action) (bool, runtime.Object, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		obj := a.(clienttesting.UpdateAction).GetObject().(*unstructured.Unstructured).DeepCopy()
		cur, err := tracker.Get(secretsResource(), a.GetNamespace(), obj.GetName())
		if err != nil {
			return true, nil, err
		}
		if got, want := obj.GetResourceVersion(), cur.(metav1.Object).GetResourceVersion(); got != want {
			return true, nil, apierrors.NewConflict(secretsResource().GroupResource(), obj.GetName(),
				fmt.Errorf("the object has been modified (resourceVersion %s, stored %s)", got, want))
		}
		obj.SetResourceVersion(f.nextRV())
		if err := tracker.Update(secretsResource(), obj, a.GetNamespace()); err != nil {
			return true, nil, err
		}
		return true, obj.DeepCopy(), nil
	})
	return f
}

func (f *fakeAPI) nextRV() string {
	f.rv++
	return strconv.Itoa(f.rv)
}

// edit changes the stored Secret's data as another client would.
func (f *fakeAPI) edit(t *testing.T, change func(data map[string][]byte)) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	cur, err := f.client.Tracker().Get(secretsResource(), testNamespace, testName)
	if err != nil {
		t.Fatalf("edit: %v", err)
	}
	obj := cur.(*unstructured.Unstructured).DeepCopy()
	data, err := secretData(obj)
	if err != nil {
		t.Fatalf("edit: %v", err)
	}
	change(data)
	if err := setSecretData(obj, data); err != nil {
		t.Fatalf("edit: %v", err)
	}
	obj.SetResourceVersion(f.nextRV())
	if err := f.client.Tracker().Update(secretsResource(), obj, testNamespace); err != nil {
		t.Fatalf("edit: %v", err)
	}
}

// secret returns the stored Secret.
func (f *fakeAPI) secret(t *testing.T) *unstructured.Unstructured {
	t.Helper()
	obj, err := f.secrets.Get(context.Background(), testName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get secret: %v", err)
	}
	return obj
}

// data returns the stored Secret's data, keyed by Secret key.
func (f *fakeAPI) data(t *testing.T) map[string]string {
	t.Helper()
	data, err := secretData(f.secret(t))
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]string, len(data))
	for k, v := range data {
		m[k] = string(v)
	}
	return m
}

// failOn makes every call with verb on secrets fail with err.
func (f *fakeAPI) failOn(verb string, err error) {
	f.client.PrependReactor(verb, "secrets", func(clienttesting.Action) (bool, runtime.Object, error) {
		return true, nil, err
	})
}

func (f *fakeAPI) newStore(t *testing.T) *Store {
	t.Helper()
	s, err := newStore(context.Background(), slog.New(slog.DiscardHandler), f.secrets, testNamespace, testName)
	if err != nil {
		t.Fatalf("newStore: %v", err)
	}
	return s
}

func mustWrite(t *testing.T, s *Store, id ipn.StateKey, v []byte) {
	t.Helper()
	if err := s.WriteState(id, v); err != nil {
		t.Fatalf("WriteState(%q): %v", id, err)
	}
}

// wantState checks that s holds exactly want.
func wantState(t *testing.T, s *Store, want map[ipn.StateKey]string) {
	t.Helper()
	for id, v := range want {
		got, err := s.ReadState(id)
		if err != nil || string(got) != v {
			t.Errorf("ReadState(%q) = %q, %v; want %q, nil", id, got, err, v)
		}
	}
	s.memMu.RLock()
	defer s.memMu.RUnlock()
	for id := range s.mem {
		if _, ok := want[id]; !ok {
			t.Errorf("store has unexpected key %q", id)
		}
	}
}

func TestNewLoadsOrCreates(t *testing.T) {
	tests := []struct {
		name        string
		existing    map[string]string // nil: no Secret
		wantState   map[ipn.StateKey]string
		wantCreated bool
	}{
		{
			name:        "missing secret is created",
			wantState:   map[ipn.StateKey]string{},
			wantCreated: true,
		},
		{
			name:      "empty secret",
			existing:  map[string]string{},
			wantState: map[ipn.StateKey]string{},
		},
		{
			name: "existing state is loaded",
			existing: map[string]string{
				"_machinekey":      "mkey",
				"_current-profile": "profile-1a2b",
				"_serve_2F1a2b":    "{}",
				"x_2D":             "not canonical, so not state",
			},
			wantState: map[ipn.StateKey]string{
				"_machinekey":      "mkey",
				"_current-profile": "profile-1a2b",
				"_serve/1a2b":      "{}",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI(t, tt.existing)
			s := f.newStore(t)
			wantState(t, s, tt.wantState)
			if got, want := s.String(), "kube:kube-public/tsrelay-state"; got != want {
				t.Errorf("String() = %q, want %q", got, want)
			}
			obj := f.secret(t)
			_, created := obj.GetLabels()[managedByLabel]
			if created != tt.wantCreated {
				t.Errorf("secret has label %s: %v, want %v", managedByLabel, created, tt.wantCreated)
			}
			if tt.wantCreated {
				if got, want := obj.GetLabels()[managedByLabel], "tsrelay"; got != want {
					t.Errorf("label %s = %q, want %q", managedByLabel, got, want)
				}
				if got, _, _ := unstructured.NestedString(obj.Object, "type"); got != "Opaque" {
					t.Errorf("secret type = %q, want Opaque", got)
				}
			}
			if got, want := s.Stats(), (Stats{}); got != want {
				t.Errorf("Stats() = %+v, want %+v", got, want)
			}
		})
	}
}

// TestRef: Ref names the Secret the Store keeps the state in, as
// namespace/name, and String is the same with tailscaled's "kube:" prefix.
func TestRef(t *testing.T) {
	f := newFakeAPI(t, nil)
	s := f.newStore(t)
	ns, name, ok := strings.Cut(s.Ref(), "/")
	if !ok {
		t.Fatalf("Ref() = %q, want namespace/name", s.Ref())
	}
	if _, err := f.client.Resource(secretsResource()).Namespace(ns).Get(t.Context(), name, metav1.GetOptions{}); err != nil {
		t.Errorf("Ref() = %q, but no such Secret holds the state: %v", s.Ref(), err)
	}
	if got, want := s.String(), "kube:"+s.Ref(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestNewForbidden(t *testing.T) {
	tests := []struct {
		verb     string
		existing map[string]string
	}{
		{verb: "get", existing: map[string]string{}},
		{verb: "create"},
		{verb: "update", existing: map[string]string{}},
		{verb: "update"}, // created, then the update check fails
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/exists=%v", tt.verb, tt.existing != nil), func(t *testing.T) {
			f := newFakeAPI(t, tt.existing)
			f.failOn(tt.verb, apierrors.NewForbidden(secretsResource().GroupResource(), testName,
				fmt.Errorf("User %q cannot %s resource", "system:serviceaccount:kube-public:tsrelay", tt.verb)))
			_, err := newStore(context.Background(), nil, f.secrets, testNamespace, testName)
			if err == nil {
				t.Fatalf("newStore succeeded, want a forbidden error")
			}
			if !apierrors.IsForbidden(err) {
				t.Errorf("newStore error %v is not Forbidden", err)
			}
			for _, want := range []string{
				"kube state secret kube-public/tsrelay-state: ",
				fmt.Sprintf("forbidden to %q secrets", tt.verb),
				`the Role needs verbs "get" and "update"`,
			} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("newStore error = %q, want it to contain %q", err, want)
				}
			}
		})
	}
}

func TestReadBackThroughSecondStore(t *testing.T) {
	state := map[ipn.StateKey]string{
		"_machinekey":               "machine private key",
		"_current-profile":          "profile-1a2b",
		"_profiles":                 `{"1a2b":{}}`,
		"profile-1a2b":              `{"Config":{}}`,
		"_routeInfo":                "{}",
		"_serve/1a2b":               "{}",
		"_current/user@example.com": "x",
		"relay.tail1234.ts.net.crt": "PEM",
		".hidden":                   "dot",
		"_AB":                       "looks like an escape",
		"ключ":                      "non-ASCII key",
		"empty-value":               "",
	}
	f := newFakeAPI(t, nil)
	s1 := f.newStore(t)
	for id, v := range state {
		mustWrite(t, s1, id, []byte(v))
	}
	s2 := f.newStore(t)
	wantState(t, s2, state)
	got, err := s2.ReadState("empty-value")
	if err != nil || got == nil {
		t.Errorf("ReadState(empty-value) = %#v, %v; want a non-nil empty slice", got, err)
	}
	if got, want := s1.Stats(), (Stats{Writes: uint64(len(state))}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
	// Tailscale's usual keys keep their names in the Secret.
	data := f.data(t)
	for _, k := range []string{"_machinekey", "_current-profile", "_profiles", "profile-1a2b", "_routeInfo"} {
		if _, ok := data[k]; !ok {
			t.Errorf("secret has no key %q; keys: %v", k, slices.Sorted(maps.Keys(data)))
		}
	}
}

func TestWriteState(t *testing.T) {
	type step struct {
		id ipn.StateKey
		v  []byte // nil: delete
	}
	tests := []struct {
		name       string
		steps      []step
		wantState  map[ipn.StateKey]string
		wantWrites uint64
	}{
		{
			name:       "nil deletes",
			steps:      []step{{"_machinekey", []byte("k")}, {"_machinekey", nil}},
			wantState:  map[ipn.StateKey]string{},
			wantWrites: 2,
		},
		{
			name:       "deleting a missing key makes no call",
			steps:      []step{{"_machinekey", nil}},
			wantState:  map[ipn.StateKey]string{},
			wantWrites: 0,
		},
		{
			name:       "unchanged value makes no call",
			steps:      []step{{"_machinekey", []byte("k")}, {"_machinekey", []byte("k")}},
			wantState:  map[ipn.StateKey]string{"_machinekey": "k"},
			wantWrites: 1,
		},
		{
			name:       "overwrite",
			steps:      []step{{"_machinekey", []byte("k1")}, {"_machinekey", []byte("k2")}},
			wantState:  map[ipn.StateKey]string{"_machinekey": "k2"},
			wantWrites: 2,
		},
		{
			name:       "empty value is not a delete",
			steps:      []step{{"_machinekey", []byte{}}},
			wantState:  map[ipn.StateKey]string{"_machinekey": ""},
			wantWrites: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI(t, nil)
			s := f.newStore(t)
			rv := f.secret(t).GetResourceVersion()
			for _, st := range tt.steps {
				mustWrite(t, s, st.id, st.v)
			}
			if tt.wantWrites == 0 {
				if got := f.secret(t).GetResourceVersion(); got != rv {
					t.Errorf("resourceVersion = %s, want %s (no write)", got, rv)
				}
			}
			if got, want := s.Stats(), (Stats{Writes: tt.wantWrites}); got != want {
				t.Errorf("Stats() = %+v, want %+v", got, want)
			}
			wantState(t, s, tt.wantState)
			wantState(t, f.newStore(t), tt.wantState)
		})
	}
}

func TestForeignKeysPreserved(t *testing.T) {
	foreign := map[string]string{
		"TS_AUTHKEY": "tskey-auth-xyz", // decodes (to itself), so it is readable, but tsrelay never writes it
		"x_2D":       "non-canonical escape",
		"_5Fab":      "non-canonical escape of _",
		".hidden":    "leading dot is escaped by encodeKey",
		"_2e":        "lower-case hex is literal",
	}
	existing := map[string]string{"_machinekey": "k"}
	for k, v := range foreign {
		existing[k] = v
	}
	f := newFakeAPI(t, existing)
	s := f.newStore(t)
	// Keys that are not the canonical encoding of a state key are not state.
	for _, id := range []ipn.StateKey{"x-", "x_2D", "_ab", "_5Fab", ".hidden", "_2e/"} {
		if got, err := s.ReadState(id); !errors.Is(err, ipn.ErrStateNotExist) {
			t.Errorf("ReadState(%q) = %q, %v; want ErrStateNotExist", id, got, err)
		}
	}

	mustWrite(t, s, "_profiles", []byte("p"))
	mustWrite(t, s, "_machinekey", nil)
	mustWrite(t, s, "x-", []byte("ours")) // its key is "x-", next to the foreign "x_2D"

	want := map[string]string{"_profiles": "p", "x-": "ours"}
	for k, v := range foreign {
		want[k] = v
	}
	if got := f.data(t); !maps.Equal(got, want) {
		t.Errorf("secret data = %v, want %v", got, want)
	}
}

func TestWriteStateConflict(t *testing.T) {
	tests := []struct {
		name  string
		other func(data map[string][]byte) // the concurrent writer's change
		want  map[string]string
	}{
		{
			name:  "other writer adds a key",
			other: func(d map[string][]byte) { d["device_id"] = []byte("n123") },
			want:  map[string]string{"_profiles": "p", "_machinekey": "k", "device_id": "n123"},
		},
		{
			name:  "other writer changes our key",
			other: func(d map[string][]byte) { d["_machinekey"] = []byte("theirs") },
			want:  map[string]string{"_profiles": "p", "_machinekey": "k"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI(t, map[string]string{"_profiles": "p"})
			s := f.newStore(t)
			// Once: another client writes between our last read and our
			// update, so the update carries a stale resourceVersion.
			var once sync.Once
			f.client.PrependReactor("update", "secrets", func(clienttesting.Action) (bool, runtime.Object, error) {
				once.Do(func() { f.edit(t, tt.other) })
				return false, nil, nil
			})
			mustWrite(t, s, "_machinekey", []byte("k"))

			if got := f.data(t); !maps.Equal(got, tt.want) {
				t.Errorf("secret data = %v, want %v", got, tt.want)
			}
			if got, want := s.Stats(), (Stats{Writes: 1, Conflicts: 1}); got != want {
				t.Errorf("Stats() = %+v, want %+v", got, want)
			}
			// Memory follows the Secret as written.
			wantMem := make(map[ipn.StateKey]string)
			for k, v := range tt.want {
				wantMem[ipn.StateKey(k)] = v
			}
			wantState(t, s, wantMem)
		})
	}
}

func TestWriteStateConflictGivesUp(t *testing.T) {
	f := newFakeAPI(t, map[string]string{})
	s := f.newStore(t)
	n := 0
	f.client.PrependReactor("update", "secrets", func(clienttesting.Action) (bool, runtime.Object, error) {
		n++
		f.edit(t, func(d map[string][]byte) { d["counter"] = []byte(strconv.Itoa(n)) })
		return false, nil, nil
	})
	err := s.WriteState("_machinekey", []byte("k"))
	if !apierrors.IsConflict(err) {
		t.Fatalf("WriteState error = %v, want a Conflict", err)
	}
	if got, want := s.Stats(), (Stats{Failures: 1, Conflicts: conflictAttempts}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
	if _, ok := f.data(t)["_machinekey"]; ok {
		t.Errorf("secret has _machinekey after a failed write")
	}
	// The write is pending: memory has it, for Run to write again.
	if got, err := s.ReadState("_machinekey"); err != nil || string(got) != "k" {
		t.Errorf("ReadState(_machinekey) = %q, %v; want the pending value k", got, err)
	}
	if since, n := s.Unpersisted(); since.IsZero() || n != 1 {
		t.Errorf("Unpersisted() = %v, %d; want a time and 1 key", since, n)
	}
}

func TestWriteStateAPIError(t *testing.T) {
	gr := secretsResource().GroupResource()
	tests := []struct {
		name    string
		verb    string
		err     error
		is      func(error) bool
		wantMsg string
	}{
		{
			name:    "server error",
			verb:    "update",
			err:     apierrors.NewInternalError(errors.New("etcdserver: request timed out")),
			is:      apierrors.IsInternalError,
			wantMsg: "update: ",
		},
		{
			name:    "update forbidden",
			verb:    "update",
			err:     apierrors.NewForbidden(gr, testName, errors.New("RBAC: denied")),
			is:      apierrors.IsForbidden,
			wantMsg: `forbidden to "update" secrets`,
		},
		{
			name:    "secret deleted",
			verb:    "update",
			err:     apierrors.NewNotFound(gr, testName),
			is:      apierrors.IsNotFound,
			wantMsg: "update: ",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI(t, map[string]string{"_machinekey": "old"})
			s := f.newStore(t)
			f.failOn(tt.verb, tt.err)

			err := s.WriteState("_machinekey", []byte("new"))
			if err == nil || !tt.is(err) {
				t.Fatalf("WriteState error = %v, want one wrapping %v", err, tt.err)
			}
			for _, want := range []string{`kube state secret kube-public/tsrelay-state: write key "_machinekey" (3 bytes): `, tt.wantMsg} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("WriteState error = %q, want it to contain %q", err, want)
				}
			}
			if got, want := s.Stats(), (Stats{Failures: 1}); got != want {
				t.Errorf("Stats() = %+v, want %+v", got, want)
			}
			// Memory has the new value, pending; the Secret the old one.
			wantState(t, s, map[ipn.StateKey]string{"_machinekey": "new"})
			if got := f.data(t)["_machinekey"]; got != "old" {
				t.Errorf("secret _machinekey = %q, want old", got)
			}
			if since, n := s.Unpersisted(); since.IsZero() || n != 1 {
				t.Errorf("Unpersisted() = %v, %d; want a time and 1 key", since, n)
			}
		})
	}
}

func TestWriteStateSize(t *testing.T) {
	type write struct {
		id   ipn.StateKey
		size int
	}
	tests := []struct {
		name    string
		before  []write // must succeed
		last    write
		wantErr bool
	}{
		{name: "one value at the limit", last: write{"k0", maxSecretSize}},
		{name: "one value over the limit", last: write{"k0", maxSecretSize + 1}, wantErr: true},
		{name: "total over the limit", before: []write{{"k0", 600 << 10}}, last: write{"k1", 600 << 10}, wantErr: true},
		{name: "replacing a big value", before: []write{{"k0", 600 << 10}, {"k0", 1}}, last: write{"k1", 600 << 10}},
		{name: "deleting makes room", before: []write{{"k0", 600 << 10}, {"k0", -1}}, last: write{"k1", maxSecretSize}},
	}
	value := func(n int) []byte {
		if n < 0 {
			return nil
		}
		return bytes.Repeat([]byte{'x'}, n)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI(t, nil)
			s := f.newStore(t)
			for _, w := range tt.before {
				mustWrite(t, s, w.id, value(w.size))
			}
			rv := f.secret(t).GetResourceVersion()
			err := s.WriteState(tt.last.id, value(tt.last.size))
			if gotErr := err != nil; gotErr != tt.wantErr {
				t.Fatalf("WriteState error = %v, want error: %v", err, tt.wantErr)
			}
			if !tt.wantErr {
				return
			}
			for _, want := range []string{"kube state secret kube-public/tsrelay-state", "over the Kubernetes limit of 1048576 bytes"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("WriteState error = %q, want it to contain %q", err, want)
				}
			}
			if got := f.secret(t).GetResourceVersion(); got != rv {
				t.Errorf("resourceVersion = %s, want %s: an oversize write reached the API", got, rv)
			}
			if got := s.Stats().Failures; got != 1 {
				t.Errorf("Stats().Failures = %d, want 1", got)
			}
		})
	}
}

func TestWriteStateBadKey(t *testing.T) {
	tests := []struct {
		id   ipn.StateKey
		want error
	}{
		{"", errEmptyKey},
		{ipn.StateKey(strings.Repeat("/", maxPlainKeyLen+1)), errKeyTooLong},
		{ipn.StateKey(strings.Repeat("a", maxKeyLen+1)), errKeyTooLong},
	}
	for _, tt := range tests {
		f := newFakeAPI(t, nil)
		s := f.newStore(t)
		if err := s.WriteState(tt.id, []byte("v")); !errors.Is(err, tt.want) {
			t.Errorf("WriteState(%.20q…) error = %v, want %v", tt.id, err, tt.want)
		}
		if got := s.Stats().Failures; got != 1 {
			t.Errorf("Stats().Failures = %d, want 1", got)
		}
	}
}

// fakeAPIServer is just enough of the Secrets REST API, over HTTP, to run New
// end to end: a real kubeconfig, the real dynamic client, JSON on the wire.
type fakeAPIServer struct {
	mu     sync.Mutex
	secret map[string]any // nil: none
	rv     int
	paths  []string // "METHOD path" of each request
	agents []string // User-Agent of each request
}

func (a *fakeAPIServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.paths = append(a.paths, r.Method+" "+r.URL.Path)
	a.agents = append(a.agents, r.UserAgent())
	w.Header().Set("Content-Type", "application/json")
	status := func(code int, reason metav1.StatusReason) {
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(metav1.Status{
			TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
			Status:   metav1.StatusFailure, Code: int32(code), Reason: reason,
		})
	}
	switch r.Method {
	case http.MethodGet:
		if a.secret == nil {
			status(http.StatusNotFound, metav1.StatusReasonNotFound)
			return
		}
	case http.MethodPost, http.MethodPut:
		var obj unstructured.Unstructured
		if err := json.NewDecoder(r.Body).Decode(&obj.Object); err != nil {
			status(http.StatusBadRequest, metav1.StatusReasonBadRequest)
			return
		}
		if r.Method == http.MethodPut && (a.secret == nil || obj.GetResourceVersion() != strconv.Itoa(a.rv)) {
			status(http.StatusConflict, metav1.StatusReasonConflict)
			return
		}
		a.rv++
		obj.SetResourceVersion(strconv.Itoa(a.rv))
		a.secret = obj.Object
	default:
		status(http.StatusMethodNotAllowed, metav1.StatusReasonMethodNotAllowed)
		return
	}
	json.NewEncoder(w).Encode(a.secret)
}

func TestNewFromKubeconfig(t *testing.T) {
	tests := []struct {
		name      string
		namespace string
		wantPath  string
	}{
		{"namespace from the context", "", "/api/v1/namespaces/from-context/secrets/tsrelay-state"},
		{"namespace given", "given", "/api/v1/namespaces/given/secrets/tsrelay-state"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			api := &fakeAPIServer{}
			srv := httptest.NewServer(api)
			t.Cleanup(srv.Close)
			kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
			cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: %q}}]
users: [{name: test, user: {token: test-token}}]
contexts: [{name: test, context: {cluster: test, user: test, namespace: from-context}}]
current-context: test
`, srv.URL)
			if err := os.WriteFile(kubeconfig, []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			t.Setenv("KUBECONFIG", kubeconfig)

			kc, err := kubeclient.New()
			if err != nil {
				t.Fatalf("kubeclient.New: %v", err)
			}
			ns := cmp.Or(tt.namespace, kc.Namespace)
			s, err := New(context.Background(), nil, kc.Dynamic, ns, testName)
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			mustWrite(t, s, "_machinekey", []byte("k"))

			api.mu.Lock()
			defer api.mu.Unlock()
			for i, p := range api.paths {
				if !strings.HasSuffix(p, " "+tt.wantPath) && p != "POST "+path.Dir(tt.wantPath) {
					t.Errorf("request %d = %q, want one for %s", i, p, tt.wantPath)
				}
				if ua := api.agents[i]; ua != "tsrelay" {
					t.Errorf("request %d User-Agent = %q, want tsrelay", i, ua)
				}
			}
			got, _, _ := unstructured.NestedString(api.secret, "data", "_machinekey")
			if want := base64.StdEncoding.EncodeToString([]byte("k")); got != want {
				t.Errorf("secret data _machinekey = %q, want %q", got, want)
			}
		})
	}
}

func TestConcurrentUse(t *testing.T) {
	f := newFakeAPI(t, nil)
	s := f.newStore(t)
	const n = 20
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			id := ipn.StateKey(fmt.Sprintf("profile-%02d", i))
			if err := s.WriteState(id, []byte(id)); err != nil {
				t.Errorf("WriteState(%q): %v", id, err)
			}
			s.ReadState("_machinekey")
		})
	}
	wg.Wait()
	want := make(map[ipn.StateKey]string)
	for i := range n {
		id := ipn.StateKey(fmt.Sprintf("profile-%02d", i))
		want[id] = string(id)
	}
	wantState(t, s, want)
	wantState(t, f.newStore(t), want)
	if got, want := s.Stats(), (Stats{Writes: n}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}

// TestWriteGuard: once the owner says no (its Lease is lost), nothing
// reaches the Secret, neither a write nor the last flush nor a re-creation;
// the change stays in memory.
func TestWriteGuard(t *testing.T) {
	f := newFakeAPI(t, map[string]string{"_machinekey": "old"})
	s := f.newStore(t)
	allowed := true
	s.SetWriteGuard(func() bool { return allowed })
	mustWrite(t, s, "_machinekey", []byte("v1"))
	allowed = false
	err := s.WriteState("_machinekey", []byte("v2"))
	if err == nil || !strings.Contains(err.Error(), "may no longer write") {
		t.Errorf("WriteState with the guard shut = %v, want an error saying it may no longer write", err)
	}
	if err := s.Flush(t.Context()); err == nil {
		t.Error("Flush with the guard shut succeeded")
	}
	if err := s.recreateLocked(t.Context(), "test"); !errors.Is(err, errFenced) {
		t.Errorf("re-create with the guard shut = %v, want errFenced", err)
	}
	if got := f.data(t)["_machinekey"]; got != "v1" {
		t.Errorf("secret _machinekey = %q, want v1: nothing may land once the guard is shut", got)
	}
	wantState(t, s, map[ipn.StateKey]string{"_machinekey": "v2"})
}
