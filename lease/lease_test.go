package lease

import (
	"context"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic/fake"
)

func TestNewChecksConfig(t *testing.T) {
	client := fake.NewSimpleDynamicClient(runtime.NewScheme())
	base := Config{Client: client, Namespace: "ns", Name: "state", Identity: "pod"}
	for _, tc := range []struct {
		name   string
		edit   func(*Config)
		want   string // error substring; "" means valid
		wantRD time.Duration
		wantRP time.Duration
	}{
		{"defaults", func(*Config) {}, "", DefaultRenewDeadline, DefaultRetryPeriod},
		{"duration only", func(c *Config) { c.Duration = 18 * time.Second }, "", 15 * time.Second, time.Second},
		{"no identity", func(c *Config) { c.Identity = "" }, "identity", 0, 0},
		{"no name", func(c *Config) { c.Name = "" }, "name", 0, 0},
		{"beyond the Lease field", func(c *Config) { c.Duration = (math.MaxInt32 + 1) * time.Second }, "whole number of seconds from 1s to", 0, 0},
		{"fractional seconds", func(c *Config) { c.Duration = 1500 * time.Millisecond }, "whole number of seconds", 0, 0},
		{"deadline not under duration", func(c *Config) { c.Duration, c.RenewDeadline = 10*time.Second, 10*time.Second }, "renew deadline", 0, 0},
		{"retry not under deadline", func(c *Config) {
			c.Duration, c.RenewDeadline, c.RetryPeriod = 10*time.Second, 5*time.Second, 5*time.Second
		}, "retry period", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := base
			tc.edit(&cfg)
			l, err := New(cfg)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("New(%+v) = %v, want an error containing %q", cfg, err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if l.cfg.RenewDeadline != tc.wantRD || l.cfg.RetryPeriod != tc.wantRP {
				t.Errorf("renew deadline, retry = %v, %v; want %v, %v", l.cfg.RenewDeadline, l.cfg.RetryPeriod, tc.wantRD, tc.wantRP)
			}
		})
	}
}

// TestLockDir locks one state directory from two openers, as two processes
// would (flock locks belong to the open file, not the process).
func TestLockDir(t *testing.T) {
	dir := t.TempDir() + "/state" // LockDir creates it
	first, err := LockDir(t.Context(), dir, "first", nil, nil)
	if err != nil {
		t.Fatalf("LockDir: %v", err)
	}
	waitingOn := make(chan string, 1)
	got := make(chan *DirLock, 1)
	go func() {
		l, err := LockDir(t.Context(), dir, "second", nil, func(holder string) { waitingOn <- holder })
		if err != nil {
			t.Errorf("second LockDir: %v", err)
		}
		got <- l
	}()
	select {
	case h := <-waitingOn:
		if h != "first" {
			t.Errorf("second waits on %q, want first", h)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("second LockDir never said it was waiting")
	}
	select {
	case <-got:
		t.Fatal("second LockDir returned while first held the lock")
	default:
	}
	// A waiter that gives up returns an error and leaves the lock alone.
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	if _, err := LockDir(ctx, dir, "third", nil, nil); err == nil {
		t.Error("third LockDir succeeded while first held the lock")
	}
	if err := first.Unlock(); err != nil {
		t.Fatal(err)
	}
	select {
	case l := <-got:
		if l == nil {
			t.Fatal("second LockDir failed")
		}
		if h := readHolder(dir + "/" + LockFile); h != "second" {
			t.Errorf("lock file names %q, want second", h)
		}
		if err := l.Unlock(); err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("second LockDir did not take the lock after first unlocked")
	}
}

func TestLockDirNamesTheProblem(t *testing.T) {
	fresh := t.TempDir() + "/new"
	if _, err := LockDir(t.Context(), fresh, "x", nil, nil); err != nil {
		t.Fatalf("LockDir on a new path: %v", err)
	}
	notDir := t.TempDir() + "/plain"
	if err := writeFile(notDir); err != nil {
		t.Fatal(err)
	}
	_, err := LockDir(t.Context(), notDir, "x", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "state directory "+notDir) {
		t.Errorf("LockDir on a regular file = %v, want an error naming the state directory", err)
	}
}

func writeFile(path string) error { return os.WriteFile(path, []byte("x"), 0o600) }
