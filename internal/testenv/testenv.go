// Package testenv decides whether a test may skip for want of something
// the machine lacks. Under `make test`, which exports TSRELAY_NO_SKIP=1,
// and in CI (CI=true), everything a test needs is promised (make test
// installs the network tools and builds the kube-apiserver first), so a
// test that would skip fails instead: a broken setup must not pass as a row
// of skips.
//
// Two kinds of skip stay allowed: -short (make test does not pass it), and,
// outside CI, not being root, so that a developer's `make test` as an
// ordinary user runs what it can (see SkipUnlessRoot). CI runs as root, so
// there a root-only test that cannot have root fails. Once root, whatever
// else a root-only test needs is promised too.
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// NoSkipEnv is the variable `make test` sets to 1 to turn skips into
// failures.
const NoSkipEnv = "TSRELAY_NO_SKIP"

// SkipAllowed reports whether a test may skip for a missing prerequisite:
// false when NoSkipEnv is 1 or CI is true.
func SkipAllowed() bool {
	return os.Getenv(NoSkipEnv) != "1" && os.Getenv("CI") != "true"
}

// SkipUnlessAllowed skips t with the formatted reason, or fails it with
// that reason when skips are not allowed (see SkipAllowed), saying why.
func SkipUnlessAllowed(t testing.TB, format string, args ...any) {
	t.Helper()
	why := fmt.Sprintf(format, args...)
	if !SkipAllowed() {
		t.Fatalf("%s (a skip is a failure here: %s)", why, forbidder())
	}
	t.Skip(why)
}

// SkipUnlessRoot skips t, saying what needs root, when the test does not
// run as root. Under make test that skip is allowed, for developers who run
// it as an ordinary user; in CI (CI=true), which runs as root, it fails.
func SkipUnlessRoot(t testing.TB, what string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("needs root for %s, and CI runs as root: a skip is a failure here (CI=true)", what)
	}
	t.Skipf("needs root for %s", what)
}

// forbidder names the setting that forbids skipping.
func forbidder() string {
	if os.Getenv(NoSkipEnv) == "1" {
		return NoSkipEnv + "=1, as make test sets it"
	}
	return "CI=true"
}
