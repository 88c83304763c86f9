package envvar

import (
	"strings"
	"testing"
	"time"
)

type inner struct {
	Port  Port `envconfig:"TEST_ENVVAR_PORT" desc:"a port"`
	Count int  `envconfig:"TEST_ENVVAR_COUNT" default:"3" desc:"a count"`
}

type outer struct {
	Name   string        `envconfig:"TEST_ENVVAR_NAME" default:"relay" desc:"a name"`
	Wait   time.Duration `envconfig:"TEST_ENVVAR_WAIT" default:"5s" desc:"a wait"`
	Secret string        `envconfig:"TEST_ENVVAR_SECRET" ignored:"true"`
	inner
}

// TestDecodeReportsEveryVariable: a bad variable in an embedded struct and
// one in the outer struct are both reported, each by name, and the good
// ones and the defaults still land.
func TestDecodeReportsEveryVariable(t *testing.T) {
	t.Setenv("TEST_ENVVAR_PORT", "99999")
	t.Setenv("TEST_ENVVAR_WAIT", "soon")
	t.Setenv("TEST_ENVVAR_NAME", "r1")
	t.Setenv("TEST_ENVVAR_SECRET", "never read")
	var c outer
	errs, failed := Decode(&c)
	if len(errs) != 2 || len(failed) != 2 {
		t.Fatalf("Decode = %v (failed %v), want the port and the wait", errs, failed)
	}
	for i, key := range []string{"TEST_ENVVAR_WAIT", "TEST_ENVVAR_PORT"} {
		if failed[i] != key || !NamesVariable(errs[i].Error(), key) {
			t.Errorf("problem %d = %q (%s), want one naming %s", i, errs[i], failed[i], key)
		}
	}
	if c.Name != "r1" || c.Count != 3 || c.Secret != "" {
		t.Errorf("decoded %+v, want Name r1 from the environment, Count 3 from its default, Secret not read", c)
	}
}

// TestUsageListsEmbedded: usage lists the embedded struct's variables with
// their defaults, and not the ignored one.
func TestUsageListsEmbedded(t *testing.T) {
	var b strings.Builder
	if err := Usage[outer](&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"TEST_ENVVAR_NAME  ", "TEST_ENVVAR_PORT  ", "TEST_ENVVAR_COUNT  "} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("usage lacks %q:\n%s", want, b.String())
		}
	}
	if strings.Contains(b.String(), "TEST_ENVVAR_SECRET") {
		t.Errorf("usage lists an ignored field:\n%s", b.String())
	}
}
