package tailnettest

import (
	"context"
	"net/netip"
	"path/filepath"
	"testing"
	"time"
)

// logTailLines is how much of a laptop's log a failed test prints.
const logTailLines = 60

// StartControlForTest is StartControl for tests: it logs to t.Logf, fails
// the test on error, and closes the Control in t.Cleanup.
func StartControlForTest(t testing.TB) *Control {
	t.Helper()
	c, err := StartControl(t.Logf)
	if err != nil {
		t.Fatalf("start control: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

// StartLaptopForTest is StartLaptop for tests, in a directory under
// t.TempDir(). It fails the test on error; in t.Cleanup it stops the laptop
// and, if the test failed, logs the tail of the laptop's log.
func StartLaptopForTest(t testing.TB, bins Binaries, name string) *Laptop {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	l, err := StartLaptop(ctx, bins, filepath.Join(t.TempDir(), name), name)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last %d lines of %s's tailscaled log:\n%s", logTailLines, name, l.LogTail(logTailLines))
		}
		if err := l.Close(); err != nil {
			t.Errorf("%v", err)
		}
	})
	return l
}

// UpForTest joins l to c's tailnet (Laptop.Up with c's URL and key) and
// returns the laptop's tailnet IPv4 address. It fails the test on error.
func UpForTest(t testing.TB, c *Control, l *Laptop) netip.Addr {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	if err := l.Up(ctx, c.URL, c.AuthKey); err != nil {
		t.Fatalf("%v", err)
	}
	ip, err := l.IP(ctx)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return ip
}
