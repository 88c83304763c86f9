package lbaddr

import (
	"fmt"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// relayTarget says which of a Service's ports lead to the relay: the
// relay's container port, by number and by name (Config.RelayPort and
// Config.RelayPortName).
//
// A Service port leads to the relay when its protocol is UDP (absent means
// TCP, as the API server defaults it) and, by the first of these rules that
// any port of the Service meets:
//
//  1. its targetPort is the number (an absent targetPort is the port itself);
//  2. its targetPort is the name;
//  3. its own name is the name and its targetPort is some other name;
//  4. it is the Service's only UDP port and its targetPort is a name.
//
// Every port that meets the deciding rule counts. A targetPort given by name
// cannot be resolved without reading the Pod, which the relay's Role does not
// allow, hence rules 2-4; 3 and 4 are assumptions, which the watcher logs.
// A numeric targetPort other than the number never leads to the relay.
type relayTarget struct {
	number uint16
	name   string // "" matches no name: only rules 1 and 4 apply

}

// String describes what r looks for, for readiness reasons, e.g. `a UDP
// port with targetPort 61441 or "relay", or named "relay"`.
func (r relayTarget) String() string {
	if r.name == "" {
		return fmt.Sprintf("a UDP port with targetPort %d", r.number)
	}
	return fmt.Sprintf("a UDP port with targetPort %d or %q, or named %q", r.number, r.name, r.name)
}

// svcPort is one entry of a Service's spec.ports.
type svcPort struct {
	name     string
	protocol string // UDP, TCP, SCTP: as given, defaulted to TCP
	port     uint16
	// Exactly one of targetNumber and targetName is set: an absent
	// targetPort is the port's own number.
	targetNumber uint16
	targetName   string
}

// String formats p as [name ]port/protocol→target, e.g.
// `stun 3478/UDP→stun` or `41000/UDP→61441`.
func (p svcPort) String() string {
	var b strings.Builder
	if p.name != "" {
		b.WriteString(p.name + " ")
	}
	fmt.Fprintf(&b, "%d/%s→", p.port, p.protocol)
	if p.targetName != "" {
		b.WriteString(p.targetName)
	} else {
		b.WriteString(strconv.Itoa(int(p.targetNumber)))
	}
	return b.String()
}

// match is the rule of RelayPort by which ports were found.
type match int

const (
	matchNone       match = iota
	matchNumber           // rule 1
	matchTargetName       // rule 2
	matchPortName         // rule 3
	matchOnlyUDP          // rule 4
)

// String says why a port was taken for the relay's, for the watcher's log.
func (m match) String() string {
	switch m {
	case matchNumber:
		return "its targetPort is the relay's port"
	case matchTargetName:
		return "its targetPort is the relay's port name"
	case matchPortName:
		return "the Service port's name is the relay's port name"
	case matchOnlyUDP:
		return "the Service's only UDP port, with a named targetPort"
	}
	return "no port leads to the relay"
}

// relayPorts returns the ports of a Service that lead to the relay and the
// rule that decided, as RelayPort describes.
func relayPorts(ports []svcPort, want relayTarget) ([]svcPort, match) {
	var udp []svcPort
	for _, p := range ports {
		if p.protocol == "UDP" {
			udp = append(udp, p)
		}
	}
	rules := []struct {
		m  match
		ok func(svcPort) bool
	}{
		{matchNumber, func(p svcPort) bool { return p.targetNumber == want.number }},
		{matchTargetName, func(p svcPort) bool { return want.name != "" && p.targetName == want.name }},
		{matchPortName, func(p svcPort) bool { return want.name != "" && p.name == want.name && p.targetName != "" }},
		{matchOnlyUDP, func(p svcPort) bool { return len(udp) == 1 && p.targetName != "" }},
	}
	for _, r := range rules {
		var found []svcPort
		for _, p := range udp {
			if r.ok(p) {
				found = append(found, p)
			}
		}
		if len(found) > 0 {
			return found, r.m
		}
	}
	return nil, matchNone
}

// maxDescribed bounds how many ports describePorts lists: the text goes
// into a readiness reason and a log line.
const maxDescribed = 8

// describePorts lists ports for a readiness reason or a log line, e.g.
// `relay 61441/UDP→relay, stun 3478/UDP→stun`, or "no ports".
func describePorts(ports []svcPort) string {
	if len(ports) == 0 {
		return "no ports"
	}
	var s []string
	for i, p := range ports {
		if i == maxDescribed {
			s = append(s, fmt.Sprintf("and %d more", len(ports)-i))
			break
		}
		s = append(s, p.String())
	}
	return strings.Join(s, ", ")
}

// servicePorts returns the entries of the Service's spec.ports whose port
// is a valid number; the others cannot lead anywhere.
func servicePorts(svc *unstructured.Unstructured) []svcPort {
	var out []svcPort
	// A malformed spec reads as no ports; the why text then says so.
	for _, sp := range slice(svc, "spec", "ports") {
		m, _ := sp.(map[string]any)
		port, ok := portNumber(m["port"])
		if !ok {
			continue
		}
		p := svcPort{port: port, protocol: "TCP"} // the API server's default
		p.name, _ = m["name"].(string)
		if proto, _ := m["protocol"].(string); proto != "" {
			p.protocol = proto
		}
		switch t := m["targetPort"].(type) {
		case nil:
			p.targetNumber = port // targetPort defaults to port
		case string:
			p.targetName = t
		default:
			if n, ok := portNumber(t); ok {
				p.targetNumber = n
			} else {
				continue
			}
		}
		out = append(out, p)
	}
	return out
}
