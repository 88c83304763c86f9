//go:build !tsrelay_upstream_relayserver

package relayserver

import (
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/disco"
	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/tsd"
	"tailscale.com/tstime"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
	"tailscale.com/util/eventbus"
	"tailscale.com/wgengine/magicsock"
)

// backend is the part of a node the extension uses: its subsystems.
type backend struct{ sys *tsd.System }

func (b backend) Sys() *tsd.System         { return b.sys }
func (b backend) Clock() tstime.Clock      { return tstime.StdClock{} }
func (b backend) TailscaleVarRoot() string { return "" }

// harness is an extension running a real udprelay.Server on a free port of
// 127.0.0.1, with subscribers for what it publishes.
type harness struct {
	e     *extension
	sys   *tsd.System
	resps *eventbus.Subscriber[magicsock.UDPRelayAllocResp]
	rejs  *eventbus.Subscriber[Rejected]
	now   time.Time
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	sys := tsd.NewSystem()
	ext, err := newExtension(logger.Discard, backend{sys})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{e: ext.(*extension), sys: sys, now: time.Unix(1e9, 0)}
	h.e.now = func() time.Time { return h.now }
	// One client each: a client delivers its events in order, so an
	// unread report would hold up the answers.
	rc, jc := sys.Bus.Get().Client("test.answers"), sys.Bus.Get().Client("test.rejections")
	h.resps = eventbus.Subscribe[magicsock.UDPRelayAllocResp](rc)
	h.rejs = eventbus.Subscribe[Rejected](jc)
	t.Cleanup(func() {
		h.e.Shutdown()
		rc.Close()
		jc.Close()
		sys.Bus.Get().Close()
	})
	port := uint16(0) // the kernel picks; the server answers with it
	prefs := &ipn.Prefs{RelayServerPort: &port, RelayServerStaticEndpoints: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:7")}}
	h.e.onPrefs(ipn.LoginProfileView{}, prefs.View(), false)
	if h.e.status().UDPPort == nil {
		t.Fatal("relay server did not start")
	}
	return h
}

// member is a peer as the relay sees it: a node key and a disco key.
type member struct {
	node  key.NodePublic
	disco key.DiscoPublic
}

func newMember() member {
	return member{key.NewNode().Public(), key.NewDisco().Public()}
}

// ask builds the request m sends for the pair (a, b).
func (m member) ask(a, b key.DiscoPublic, gen uint32) magicsock.UDPRelayAllocReq {
	return magicsock.UDPRelayAllocReq{
		RxFromNodeKey:  m.node,
		RxFromDiscoKey: m.disco,
		Message:        &disco.AllocateUDPRelayEndpointRequest{ClientDisco: [2]key.DiscoPublic{a, b}, Generation: gen},
	}
}

// answer waits for the extension's answer.
func (h *harness) answer(t *testing.T) magicsock.UDPRelayAllocResp {
	t.Helper()
	select {
	case r := <-h.resps.Events():
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no allocation answer within 10s")
		return magicsock.UDPRelayAllocResp{}
	}
}

// metrics returns the node's user metrics exposition.
func (h *harness) metrics() string {
	w := httptest.NewRecorder()
	h.sys.UserMetricsRegistry().Handler(w, httptest.NewRequest("GET", "/", nil))
	return w.Body.String()
}

func (h *harness) rejected(reason Reason) string {
	return rejectedMetric + `{reason="` + string(reason) + `"}`
}

// TestHostileRequests sends the real server every request that could crash
// or misuse it, and then a good one, which must still be answered.
func TestHostileRequests(t *testing.T) {
	h := newHarness(t)
	m := newMember()
	other := newMember()
	var zero key.DiscoPublic

	// A good request first: the server reveals its disco key.
	h.e.onAllocReq(m.ask(m.disco, other.disco, 7))
	first := h.answer(t)
	serverDisco := first.Message.ServerDisco
	if serverDisco.IsZero() || first.Message.Generation != 7 || first.ReqRxFromNodeKey != m.node || first.ReqRxFromDiscoKey != m.disco {
		t.Fatalf("answer = %+v, want the server's disco key, generation 7 and the sender's keys", first)
	}

	hostile := []struct {
		name string
		req  magicsock.UDPRelayAllocReq
		want Reason
	}{
		{"no message", magicsock.UDPRelayAllocReq{RxFromNodeKey: m.node, RxFromDiscoKey: m.disco}, ReasonNoMessage},
		{"zero second key (the crash)", m.ask(m.disco, zero, 1), ReasonZeroKey},
		{"zero first key", m.ask(zero, m.disco, 1), ReasonZeroKey},
		{"both zero", m.ask(zero, zero, 1), ReasonZeroKey},
		{"same keys", m.ask(m.disco, m.disco, 1), ReasonSameKeys},
		{"sender not a client", m.ask(other.disco, newMember().disco, 1), ReasonNotSender},
		{"zero node key", member{disco: m.disco}.ask(m.disco, other.disco, 1), ReasonZeroNodeKey},
		{"server's own key", m.ask(m.disco, serverDisco, 1), ReasonServerKey},
	}
	for _, tc := range hostile {
		t.Run(tc.name, func(t *testing.T) {
			if got := Check(tc.req, serverDisco); got != tc.want {
				t.Errorf("Check = %q, want %q", got, tc.want)
			}
			h.e.onAllocReq(tc.req) // without the checks, the zero keys panic here
			if got := h.metrics(); !strings.Contains(got, h.rejected(tc.want)+" ") {
				t.Errorf("metrics do not count %s:\n%s", tc.want, got)
			}
		})
	}
	select {
	case r := <-h.resps.Events():
		t.Fatalf("a rejected request was answered: %+v", r)
	default:
	}
	if n := len(h.e.status().Sessions); n != 1 {
		t.Errorf("server holds %d sessions, want only the good request's", n)
	}

	// The same member is still served.
	h.e.onAllocReq(m.ask(m.disco, newMember().disco, 9))
	if got := h.answer(t); got.Message.ServerDisco != serverDisco || got.Message.Generation != 9 {
		t.Errorf("answer after the hostile requests = %+v", got)
	}
	want := map[Reason]int{ReasonZeroKey: 3, ReasonNoMessage: 1, ReasonSameKeys: 1, ReasonRateLimited: 0}
	for r, n := range want {
		line := h.rejected(r) + " " + strconv.Itoa(n)
		if got := h.metrics(); !strings.Contains(got, line+"\n") {
			t.Errorf("metrics lack %q:\n%s", line, got)
		}
	}
}

// TestRejectionsReportedOncePerInterval checks that a sender who repeats a
// bad request is reported once per LogInterval, with the count of the rest.
func TestRejectionsReportedOncePerInterval(t *testing.T) {
	h := newHarness(t)
	m := newMember()
	bad := m.ask(m.disco, key.DiscoPublic{}, 1)
	for range 5 {
		h.e.onAllocReq(bad)
	}
	first := h.rejection(t)
	if first.From != m.node || first.Reason != ReasonZeroKey || first.Suppressed != 0 {
		t.Errorf("first report = %+v, want from the member, %s, none suppressed", first, ReasonZeroKey)
	}
	h.noRejection(t)

	// Another sender is reported at once.
	m2 := newMember()
	h.e.onAllocReq(m2.ask(m2.disco, m2.disco, 1))
	if r := h.rejection(t); r.From != m2.node || r.Reason != ReasonSameKeys {
		t.Errorf("second sender's report = %+v", r)
	}

	h.now = h.now.Add(LogInterval)
	h.e.onAllocReq(bad)
	if r := h.rejection(t); r.From != m.node || r.Suppressed != 4 {
		t.Errorf("report after the interval = %+v, want the 4 unreported ones counted", r)
	}
}

func (h *harness) rejection(t *testing.T) Rejected {
	t.Helper()
	select {
	case r := <-h.rejs.Events():
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no rejection reported within 10s")
		return Rejected{}
	}
}

// noRejection checks that nothing more was reported by the time a later
// good request was answered. Reports and answers are published from
// separate goroutines, so this is a spot check; the Suppressed count of the
// next report is what proves the repeats were held back.
func (h *harness) noRejection(t *testing.T) {
	t.Helper()
	m := newMember()
	h.e.onAllocReq(m.ask(m.disco, newMember().disco, 1))
	h.answer(t)
	select {
	case r := <-h.rejs.Events():
		t.Errorf("unexpected report %+v", r)
	default:
	}
}

// TestSenderRateLimit checks that one sender cannot make the server hold
// unbounded sessions, and that others are not affected.
func TestSenderRateLimit(t *testing.T) {
	h := newHarness(t)
	m := newMember()
	start := time.Now()
	for i := range AllocBurst * 2 {
		h.e.onAllocReq(m.ask(m.disco, newMember().disco, uint32(i)))
	}
	// The bucket refills while the loop runs: allow for that.
	refilled := int(time.Since(start).Seconds()*AllocRate) + 1
	sessions := len(h.e.status().Sessions)
	if sessions < AllocBurst || sessions > AllocBurst+refilled {
		t.Errorf("one sender made %d sessions, want %d to %d", sessions, AllocBurst, AllocBurst+refilled)
	}
	if got := h.metrics(); strings.Contains(got, h.rejected(ReasonRateLimited)+" 0\n") {
		t.Errorf("no rate-limited rejections counted:\n%s", got)
	}
	o := newMember()
	h.e.onAllocReq(o.ask(o.disco, m.disco, 1))
	for {
		if r := h.answer(t); r.ReqRxFromNodeKey == o.node {
			break
		}
	}
}

// TestServerFollowsPrefsAndNode checks that the server runs only while a
// port is set and the tailnet allows it.
func TestServerFollowsPrefsAndNode(t *testing.T) {
	h := newHarness(t)
	h.e.onPrefs(ipn.LoginProfileView{}, (&ipn.Prefs{}).View(), true)
	if h.e.status().UDPPort != nil {
		t.Error("server still running after RelayServerPort was cleared")
	}
	port := uint16(0)
	h.e.onPrefs(ipn.LoginProfileView{}, (&ipn.Prefs{RelayServerPort: &port}).View(), true)
	if h.e.status().UDPPort == nil {
		t.Error("server not running after RelayServerPort was set again")
	}
	disabled := &tailcfg.Node{CapMap: tailcfg.NodeCapMap{tailcfg.NodeAttrDisableRelayServer: nil}}
	h.e.onSelf(disabled.View())
	if h.e.status().UDPPort != nil {
		t.Error("server running on a node with disable-relay-server")
	}
	m := newMember()
	h.e.onAllocReq(m.ask(m.disco, newMember().disco, 1)) // must not start it
	if h.e.status().UDPPort != nil {
		t.Error("a request started the server on a node with disable-relay-server")
	}
	h.e.onSelf((&tailcfg.Node{}).View())
	if h.e.status().UDPPort == nil {
		t.Error("server not running after disable-relay-server was lifted")
	}
}
