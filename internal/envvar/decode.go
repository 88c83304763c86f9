package envvar

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"reflect"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kelseyhightower/envconfig"
)

// Walk calls fn for every field of the struct v that is read from the
// environment (it has an envconfig tag and is not ignored), in field order,
// descending into embedded structs as envconfig does. It is the one walk
// that decoding and usage share, so neither can miss a variable the other
// sees.
func Walk(v reflect.Value, fn func(f reflect.StructField, val reflect.Value)) {
	t := v.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		if f.Anonymous && f.Type.Kind() == reflect.Struct {
			Walk(v.Field(i), fn)
			continue
		}
		if f.Tag.Get("envconfig") == "" || f.Tag.Get("ignored") == "true" {
			continue
		}
		fn(f, v.Field(i))
	}
}

// Decode sets every field of the struct cfg points to from its variable, or
// from its default tag when the variable is unset, and returns an error for
// each variable that does not parse ("KEY=value: why"), with the names of
// those variables. Every variable is tried, so that one run lists every
// problem.
func Decode(cfg any) (errs []error, failed []string) {
	Walk(reflect.ValueOf(cfg).Elem(), func(f reflect.StructField, v reflect.Value) {
		key := f.Tag.Get("envconfig")
		s, ok := os.LookupEnv(key)
		if !ok {
			if s, ok = f.Tag.Lookup("default"); !ok {
				return
			}
		}
		if err := DecodeValue(v, s); err != nil {
			errs = append(errs, fmt.Errorf("%s=%s: %w", key, s, err))
			failed = append(failed, key)
		}
	})
	return errs, failed
}

// DecodeValue decodes s into v: through its envconfig.Decoder if it has
// one, else as a duration, string, bool, integer or number. A type it
// cannot read gives an error that starts with "cannot read".
func DecodeValue(v reflect.Value, s string) error {
	if d, ok := v.Addr().Interface().(envconfig.Decoder); ok {
		return d.Decode(s)
	}
	if v.Type() == reflect.TypeFor[time.Duration]() {
		d, err := time.ParseDuration(s)
		if err != nil {
			return errors.New("not a duration; want e.g. 90s")
		}
		v.SetInt(int64(d))
		return nil
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(s)
	case reflect.Bool:
		b, err := strconv.ParseBool(s)
		if err != nil {
			return errors.New("not a boolean; want true or false")
		}
		v.SetBool(b)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n, err := strconv.ParseInt(strings.TrimSpace(s), 10, v.Type().Bits())
		if err != nil {
			return errors.New("not a whole number")
		}
		v.SetInt(n)
	case reflect.Float32, reflect.Float64:
		f, err := strconv.ParseFloat(strings.TrimSpace(s), v.Type().Bits())
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return errors.New("not a number")
		}
		v.SetFloat(f)
	default:
		// A programming error, caught by the relay's TestEveryVariableDecodes.
		return fmt.Errorf("cannot read a %s from the environment", v.Type())
	}
	return nil
}

// Usage writes every variable of the struct type T with its default and
// meaning (the desc tag) as a table. It walks the tags itself rather than
// through envconfig's template-based usage: text/template makes the linker
// keep every exported method in the program, megabytes of them.
func Usage[T any](w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VARIABLE\tDEFAULT\tMEANING")
	Walk(reflect.New(reflect.TypeFor[T]()).Elem(), func(f reflect.StructField, _ reflect.Value) {
		def := f.Tag.Get("default")
		if def == "" {
			def = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Tag.Get("envconfig"), def, f.Tag.Get("desc"))
	})
	return tw.Flush()
}

// NamesVariable reports whether msg is about variable key: it starts with
// key followed by '=' or ' ', as every message of Decode and of the
// packages' validations does.
func NamesVariable(msg, key string) bool {
	rest, ok := strings.CutPrefix(msg, key)
	return ok && (strings.HasPrefix(rest, "=") || strings.HasPrefix(rest, " "))
}

// Unjoin returns the errors errors.Join joined, or err alone, so that a
// list of problems has one entry per problem.
func Unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}
