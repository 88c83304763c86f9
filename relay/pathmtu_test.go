package relay

import (
	"testing"

	"tailscale.com/ipn"

	"github.com/tsrelay/tsrelay/pathmtu"
)

// TestPathMTUVerdict checks which checks count as a change of verdict (and
// so log and record an Event), and that the path MTU never touches
// readiness.
func TestPathMTUVerdict(t *testing.T) {
	a := testRelay(t)
	s := a.status
	s.setBackendState(ipn.Running)
	pass(a, true, true, 0)
	check := func(paths ...pathmtu.Path) mtuCheck {
		return mtuCheck{report: pathmtu.Judge(paths), checked: true}
	}
	eth := func(mtu int) pathmtu.Path {
		return pathmtu.Path{Family: pathmtu.IPv4, Interface: "eth0", Kind: "veth", LinkMTU: mtu}
	}
	steps := []struct {
		name        string
		check       mtuCheck
		wantChanged bool
		wantWarning bool
	}{
		{"first check", check(eth(1230)), true, true},
		{"same again", check(eth(1230)), false, true},
		{"other small MTU", check(eth(1300)), true, true},
		{"fixed", check(eth(1450)), true, false},
		{"still fixed", check(eth(1450)), false, false},
		{"check fails", mtuCheck{err: "netlink: permission denied", checked: true}, true, false},
		{"fails the same way", mtuCheck{err: "netlink: permission denied", checked: true}, false, false},
	}
	for _, st := range steps {
		if got := s.setPathMTU(st.check); got != st.wantChanged {
			t.Errorf("%s: setPathMTU changed = %v, want %v", st.name, got, st.wantChanged)
		}
		snap := s.snapshot()
		if !snap.Ready {
			t.Errorf("%s: not ready (%s); the path MTU must not affect readiness", st.name, snap.Reason)
		}
		if got := len(snap.Warnings) > 0; got != st.wantWarning {
			t.Errorf("%s: warnings %q, want some: %v", st.name, snap.Warnings, st.wantWarning)
		}
		if snap.PathMTU == nil || snap.PathMTU.OK == (st.wantWarning || st.check.err != "") {
			t.Errorf("%s: pathMTU = %+v, want ok %v", st.name, snap.PathMTU, !st.wantWarning && st.check.err == "")
		}
	}
}
