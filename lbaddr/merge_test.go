package lbaddr

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

func ep(s string, src Source) Endpoint {
	return Endpoint{AddrPort: netip.MustParseAddrPort(s), Source: src}
}

func TestMerge(t *testing.T) {
	tests := []struct {
		name        string
		explicit    []netip.AddrPort
		found       []Endpoint
		max         int
		want        []Endpoint
		wantDropped []Endpoint
	}{
		{
			name:     "explicit first, in their given order",
			explicit: addrPorts("203.0.113.7:61441", "192.0.2.10:61441"),
			found:    []Endpoint{ep("[2001:db8::1]:41000", SourceService), ep("198.51.100.1:41000", SourceDNS)},
			max:      MaxEndpoints,
			want: []Endpoint{
				ep("203.0.113.7:61441", SourceExplicit), ep("192.0.2.10:61441", SourceExplicit),
				ep("198.51.100.1:41000", SourceDNS), ep("[2001:db8::1]:41000", SourceService),
			},
		},
		{
			name:     "explicit wins over the same address found",
			explicit: addrPorts("192.0.2.10:41000"),
			found:    []Endpoint{ep("192.0.2.10:41000", SourceService), ep("192.0.2.10:41001", SourceService)},
			max:      MaxEndpoints,
			want:     []Endpoint{ep("192.0.2.10:41000", SourceExplicit), ep("192.0.2.10:41001", SourceService)},
		},
		{
			name:     "duplicates among explicit and found dropped; service beats dns",
			explicit: addrPorts("203.0.113.7:61441", "203.0.113.7:61441", "[::ffff:203.0.113.7]:61441"),
			found: []Endpoint{
				ep("192.0.2.10:41000", SourceDNS), ep("192.0.2.10:41000", SourceService), ep("[::ffff:192.0.2.10]:41000", SourceDNS),
			},
			max:  MaxEndpoints,
			want: []Endpoint{ep("203.0.113.7:61441", SourceExplicit), ep("192.0.2.10:41000", SourceService)},
		},
		{
			name:  "found sorted by address then port",
			found: []Endpoint{ep("192.0.2.10:2", SourceService), ep("192.0.2.9:3", SourceService), ep("192.0.2.10:1", SourceDNS)},
			max:   MaxEndpoints,
			want:  []Endpoint{ep("192.0.2.9:3", SourceService), ep("192.0.2.10:1", SourceDNS), ep("192.0.2.10:2", SourceService)},
		},
		{
			name:     "invalid skipped",
			explicit: []netip.AddrPort{{}},
			found:    []Endpoint{{Source: SourceService}, ep("192.0.2.10:1", SourceService)},
			max:      MaxEndpoints,
			want:     []Endpoint{ep("192.0.2.10:1", SourceService)},
		},
		{
			name:        "capped; explicit kept before found",
			explicit:    addrPorts("203.0.113.7:1", "203.0.113.7:2"),
			found:       []Endpoint{ep("192.0.2.3:1", SourceService), ep("192.0.2.1:1", SourceService), ep("192.0.2.2:1", SourceDNS)},
			max:         3,
			want:        []Endpoint{ep("203.0.113.7:1", SourceExplicit), ep("203.0.113.7:2", SourceExplicit), ep("192.0.2.1:1", SourceService)},
			wantDropped: []Endpoint{ep("192.0.2.2:1", SourceDNS), ep("192.0.2.3:1", SourceService)},
		},
		{
			name:     "no limit",
			explicit: addrPorts("203.0.113.7:1", "203.0.113.7:2"),
			max:      0,
			want:     []Endpoint{ep("203.0.113.7:1", SourceExplicit), ep("203.0.113.7:2", SourceExplicit)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			found := slices.Clone(tt.found)
			got, dropped := Merge(tt.explicit, tt.found, tt.max)
			if !slices.Equal(got, tt.want) {
				t.Errorf("Merge merged = %v, want %v", got, tt.want)
			}
			if !slices.Equal(dropped, tt.wantDropped) {
				t.Errorf("Merge dropped = %v, want %v", dropped, tt.wantDropped)
			}
			if !slices.Equal(found, tt.found) {
				t.Errorf("Merge modified found: %v, was %v", tt.found, found)
			}
		})
	}
}

// TestMergeStable checks that the order of found does not matter, so an
// unchanged set never looks like an update.
func TestMergeStable(t *testing.T) {
	explicit := addrPorts("203.0.113.7:61441", "192.0.2.200:61441")
	var found []Endpoint
	for i := range 30 {
		found = append(found,
			ep(fmt.Sprintf("192.0.2.%d:%d", 100-i, 41000+i%3), SourceService),
			ep(fmt.Sprintf("[2001:db8::%x]:41000", i), SourceDNS),
			ep(fmt.Sprintf("192.0.2.%d:%d", 100-i, 41000+i%3), SourceDNS), // a duplicate of the service one
		)
	}
	want, wantDropped := Merge(explicit, found, MaxEndpoints)
	if len(want) != MaxEndpoints || len(want)+len(wantDropped) != 2+60 {
		t.Fatalf("Merge gave %d merged and %d dropped, want %d and %d", len(want), len(wantDropped), MaxEndpoints, 62-MaxEndpoints)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20 {
		rng.Shuffle(len(found), func(i, j int) { found[i], found[j] = found[j], found[i] })
		got, dropped := Merge(explicit, found, MaxEndpoints)
		if !slices.Equal(got, want) || !slices.Equal(dropped, wantDropped) {
			t.Fatalf("shuffle %d: Merge = %v, %v; want %v, %v", i, got, dropped, want, wantDropped)
		}
	}
	for _, e := range want[2:] {
		if e.AddrPort.Addr().Is4() && e.Source != SourceService {
			t.Errorf("Merge kept %v; want the service copy of a duplicate", e)
		}
	}
}

func TestEndpointString(t *testing.T) {
	for _, tt := range []struct {
		ep   Endpoint
		want string
	}{
		{ep("192.0.2.7:61441", SourceExplicit), "192.0.2.7:61441(explicit)"},
		{ep("[2001:db8::7]:41000", SourceService), "[2001:db8::7]:41000(service)"},
		{ep("198.51.100.3:41000", SourceDNS), "198.51.100.3:41000(dns)"},
	} {
		if got := tt.ep.String(); got != tt.want {
			t.Errorf("%#v.String() = %q, want %q", tt.ep, got, tt.want)
		}
	}
	// fmt uses it too, as logs and status messages do.
	if got, want := fmt.Sprint([]Endpoint{ep("192.0.2.7:61441", SourceExplicit)}), "[192.0.2.7:61441(explicit)]"; got != want {
		t.Errorf("fmt.Sprint = %q, want %q", got, want)
	}
}
