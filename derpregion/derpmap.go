package derpregion

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"regexp"

	"go.yaml.in/yaml/v3"
	"tailscale.com/tailcfg"
)

// Region IDs and code a relay's region gets unless configured otherwise.
// Tailscale keeps region IDs 900-999 for a tailnet's own regions (its
// custom DERP documentation, checked 2026-12); its own regions are numbered
// from 1.
const (
	DefaultRegionID   = 900
	DefaultRegionCode = "tsrelay"
	MinRegionID       = 900
	MaxRegionID       = 999
)

// RegionNamePrefix starts the name Region gives a region by default, so
// that `relay check` on a laptop can tell a tsrelay's region.
const RegionNamePrefix = "tsrelay in-cluster"

// regionCodeRE is what a region code may look like: `tailscale ping` and
// `tailscale status` print it as "DERP(<code>)".
var regionCodeRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

// ValidateRegion checks a region ID and code, naming the settings in its
// errors as envID and envCode.
func ValidateRegion(id int, code, envID, envCode string) error {
	var errs []error
	if id < MinRegionID || id > MaxRegionID {
		errs = append(errs, fmt.Errorf("%s=%d: want a region ID from %d to %d (the range Tailscale keeps for a tailnet's own regions)", envID, id, MinRegionID, MaxRegionID))
	}
	if !regionCodeRE.MatchString(code) {
		errs = append(errs, fmt.Errorf("%s=%q: want 1-32 lower-case letters, digits and hyphens, starting with a letter or digit", envCode, code))
	}
	return errors.Join(errs...)
}

// RegionOptions describe the region a relay serves.
type RegionOptions struct {
	// RegionID and RegionCode identify the region (ValidateRegion).
	RegionID   int
	RegionCode string
	// RegionName is shown in the admin console and `tailscale netcheck`;
	// empty means RegionNamePrefix + " (<code>)".
	RegionName string
	// Cert is the server's certificate: it gives HostName and CertName.
	Cert *Cert
	// Addrs are the addresses clients dial (the load balancer's, or a
	// forwarded public address). The first IPv4 and the first IPv6 are
	// used; with none of a family, that family is disabled.
	Addrs []netip.Addr
	// DERPPort and STUNPort are the ports clients dial (the Service's,
	// which may differ from the ports the pod listens on).
	DERPPort, STUNPort int
	// Members, when set, make a region of several meshed nodes, one per
	// member in this order (Addrs is then unused). A member whose
	// addresses are not known yet is left out; names follow the member's
	// position ("<regionID>a", "<regionID>b", ...), so they stay put.
	Members []Member
}

// Member is one node of a meshed region as clients dial it.
type Member struct {
	// Addrs as in RegionOptions.Addrs.
	Addrs []netip.Addr
	// DERPPort and STUNPort; 0 means RegionOptions' ports.
	DERPPort, STUNPort int
}

// Region returns the derpMap region for o: one node, dialled at its IP
// literals, so no client needs DNS for it.
func Region(o RegionOptions) (*tailcfg.DERPRegion, error) {
	if err := ValidateRegion(o.RegionID, o.RegionCode, "region ID", "region code"); err != nil {
		return nil, fmt.Errorf("derpregion: %w", err)
	}
	if o.Cert == nil {
		return nil, errors.New("derpregion: region needs the server's certificate")
	}
	members := o.Members
	if len(members) == 0 {
		members = []Member{{Addrs: o.Addrs}}
	}
	if len(members) > 26 {
		return nil, fmt.Errorf("derpregion: %d members, want at most 26", len(members))
	}
	var nodes []*tailcfg.DERPNode
	var firstErr error
	for i, m := range members {
		n, err := regionNode(o, m, i)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		nodes = append(nodes, n)
	}
	if len(nodes) == 0 {
		return nil, firstErr
	}
	name := o.RegionName
	if name == "" {
		name = RegionNamePrefix + " (" + o.RegionCode + ")"
	}
	return &tailcfg.DERPRegion{
		RegionID:   o.RegionID,
		RegionCode: o.RegionCode,
		RegionName: name,
		Nodes:      nodes,
	}, nil
}

// regionNode is the node for member i.
func regionNode(o RegionOptions, m Member, i int) (*tailcfg.DERPNode, error) {
	derpPort, stunPort := o.DERPPort, o.STUNPort
	if m.DERPPort != 0 {
		derpPort = m.DERPPort
	}
	if m.STUNPort != 0 {
		stunPort = m.STUNPort
	}
	n := &tailcfg.DERPNode{
		Name:     fmt.Sprintf("%d%c", o.RegionID, 'a'+i),
		RegionID: o.RegionID,
		HostName: o.Cert.HostName,
		CertName: o.Cert.CertName(),
		IPv4:     "none",
		IPv6:     "none",
		DERPPort: derpPort,
		STUNPort: stunPort,
	}
	for _, a := range m.Addrs {
		a = a.Unmap()
		switch {
		case a.Is4() && n.IPv4 == "none":
			n.IPv4 = a.String()
		case a.Is6() && n.IPv6 == "none":
			n.IPv6 = a.WithZone("").String()
		}
	}
	if n.IPv4 == "none" && n.IPv6 == "none" {
		if o.Cert.selfSigned {
			// SelfSignedHostName does not resolve.
			return nil, errors.New("derpregion: a region with a self-signed certificate needs an address to dial (none known yet)")
		}
		// A user-provided certificate's host name resolves in DNS.
		n.IPv4, n.IPv6 = "", ""
	}
	return n, nil
}

// PolicyJSON returns the value for the tailnet policy file's "derpMap":
// Tailscale's regions stay (OmitDefaultRegions is false) and r is added.
func PolicyJSON(r *tailcfg.DERPRegion) ([]byte, error) {
	m := tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{r.RegionID: r}}
	bs, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("derpregion: encode the derpMap: %w", err)
	}
	return append(bs, '\n'), nil
}

// Headscale decodes its derp.paths files with yaml.v3 into a
// tailcfg.DERPMap, so the keys are the Go field names in lower case.
type (
	hsMap struct {
		Regions map[int]hsRegion `yaml:"regions"`
	}
	hsRegion struct {
		RegionID   int      `yaml:"regionid"`
		RegionCode string   `yaml:"regioncode"`
		RegionName string   `yaml:"regionname"`
		Nodes      []hsNode `yaml:"nodes"`
	}
	hsNode struct {
		Name     string `yaml:"name"`
		RegionID int    `yaml:"regionid"`
		HostName string `yaml:"hostname"`
		CertName string `yaml:"certname,omitempty"`
		IPv4     string `yaml:"ipv4,omitempty"`
		IPv6     string `yaml:"ipv6,omitempty"`
		STUNPort int    `yaml:"stunport"`
		DERPPort int    `yaml:"derpport"`
	}
)

// HeadscaleYAML returns a file for Headscale's derp.paths holding r.
func HeadscaleYAML(r *tailcfg.DERPRegion) ([]byte, error) {
	hr := hsRegion{RegionID: r.RegionID, RegionCode: r.RegionCode, RegionName: r.RegionName}
	for _, n := range r.Nodes {
		hr.Nodes = append(hr.Nodes, hsNode{
			Name: n.Name, RegionID: n.RegionID, HostName: n.HostName, CertName: n.CertName,
			IPv4: n.IPv4, IPv6: n.IPv6, STUNPort: n.STUNPort, DERPPort: n.DERPPort,
		})
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(hsMap{Regions: map[int]hsRegion{r.RegionID: hr}}); err != nil {
		return nil, fmt.Errorf("derpregion: encode the Headscale DERP file: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("derpregion: encode the Headscale DERP file: %w", err)
	}
	return buf.Bytes(), nil
}
