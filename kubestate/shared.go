package kubestate

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
)

// ensureAttempts bounds EnsureSecret's create/update races; each lost race
// means another writer completed the Secret, so a few suffice.
const ensureAttempts = 5

// ensureTimeout bounds all of EnsureSecret's calls, in addition to the
// caller's ctx: it runs while the relay holds its Lease, and a hung API
// server must fail the start-up rather than stall it past the renew
// deadline.
const ensureTimeout = 30 * time.Second

// EnsureSecret returns the data of Secret name in namespace after complete
// has filled in what is missing, for state several pods must share (the
// DERP region's mesh key and certificate). complete returns its input
// plus what it adds and whether it added anything; it must never change a
// value that is there. A missing Secret is created with complete(nil); an
// incomplete one is updated with its resourceVersion. The calls are bounded
// by 30 s in all. When another pod
// wins the race (AlreadyExists, Conflict), its Secret is read again and
// adopted, never overwritten, so every pod ends with the same data. RBAC:
// "get" and "update" on the name, "create" on secrets.
func EnsureSecret(ctx context.Context, client dynamic.Interface, namespace, name string,
	complete func(map[string][]byte) (map[string][]byte, bool, error)) (map[string][]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, ensureTimeout)
	defer cancel()
	secrets := client.Resource(secretsResource()).Namespace(namespace)
	ref := namespace + "/" + name
	for range ensureAttempts {
		obj, err := secrets.Get(ctx, name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			data, _, err := complete(nil)
			if err != nil {
				return nil, fmt.Errorf("secret %s: %w", ref, err)
			}
			obj := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Secret", "type": "Opaque"}}
			obj.SetNamespace(namespace)
			obj.SetName(name)
			obj.SetLabels(map[string]string{managedByLabel: managedByValue})
			if err := setSecretData(obj, data); err != nil {
				return nil, err
			}
			_, err = secrets.Create(ctx, obj, metav1.CreateOptions{FieldManager: fieldManager})
			if apierrors.IsAlreadyExists(err) {
				continue // another pod created it first: adopt theirs
			}
			if err != nil {
				return nil, fmt.Errorf("create secret %s: %w", ref, ensureHint(err))
			}
			return data, nil
		case err != nil:
			return nil, fmt.Errorf("get secret %s: %w", ref, ensureHint(err))
		}
		have, err := secretData(obj)
		if err != nil {
			return nil, fmt.Errorf("secret %s: %w", ref, err)
		}
		data, changed, err := complete(have)
		if err != nil {
			return nil, fmt.Errorf("secret %s: %w", ref, err)
		}
		if !changed {
			return data, nil
		}
		next := obj.DeepCopy() // keeps the resourceVersion: optimistic concurrency
		if err := setSecretData(next, data); err != nil {
			return nil, err
		}
		_, err = secrets.Update(ctx, next, metav1.UpdateOptions{FieldManager: fieldManager})
		if apierrors.IsConflict(err) {
			continue // another pod completed it first: read theirs
		}
		if err != nil {
			return nil, fmt.Errorf("update secret %s: %w", ref, ensureHint(err))
		}
		return data, nil
	}
	return nil, fmt.Errorf("secret %s: still changing after %d attempts", ref, ensureAttempts)
}

// ensureHint says which RBAC EnsureSecret needs when err is Forbidden.
func ensureHint(err error) error {
	if apierrors.IsForbidden(err) {
		return fmt.Errorf(`the Role needs "get" and "update" on this Secret (resourceNames) and "create" on secrets: %w`, err)
	}
	return err
}
