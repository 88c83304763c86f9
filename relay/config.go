package relay

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tsrelay/tsrelay/internal/envvar"
	"github.com/tsrelay/tsrelay/internal/memtune"
	"github.com/tsrelay/tsrelay/keyless"
	"github.com/tsrelay/tsrelay/lbaddr"
)

// The range TS_LEASE_DURATION accepts. Below 6 s the retry period (1/18 of
// it) would be under the API server's usual answer time; above an hour a
// relay killed without releasing its Lease would keep its identity out of
// use for longer than any outage worth riding out (and the Lease stores the
// duration as a 32-bit count of seconds, which a longer setting could
// overflow).
const (
	minLeaseDuration = 6 * time.Second
	maxLeaseDuration = time.Hour
)

// Config is everything the relay reads from its environment. The variable
// names follow Tailscale's container image where the meaning is the same, so
// that people moving from a hand-built tailscale/tailscale pod keep their
// Secrets and manifests.
type Config struct {
	AuthKey       string `envconfig:"TS_AUTHKEY" desc:"Tailscale auth key used for the first login; ignored once the node has state. Tagged, reusable or one-off keys all work."`
	AuthKeyAlias  string `envconfig:"TS_AUTH_KEY" desc:"Alias of TS_AUTHKEY."`
	ClientSecret  string `envconfig:"TS_CLIENT_SECRET" desc:"OAuth client secret (tskey-client-...) used to mint an auth key at first login. Requires TS_ADVERTISE_TAGS."`
	AdvertiseTags Tags   `envconfig:"TS_ADVERTISE_TAGS" desc:"Comma-separated ACL tags for this node, each tag:name (e.g. tag:relay)."`
	Hostname      string `envconfig:"TS_HOSTNAME" default:"tsrelay" desc:"Name of this node in the tailnet."`
	ControlURL    string `envconfig:"TS_CONTROL_URL" desc:"Coordination server URL; empty means Tailscale's (use it for Headscale or tests)."`

	// Keyless login (package keyless): workload identity federation.
	ClientID    string `envconfig:"TS_CLIENT_ID" desc:"Keyless login: client ID of a federated identity (trusted credential) in the admin console. At first login the relay trades its ID token for a one-off auth key: a node that is not ephemeral and is preauthorized, unless the ID ends in ?ephemeral=true or ?preauthorized=false. Requires TS_ADVERTISE_TAGS and TS_ID_TOKEN_FILE or TS_ID_TOKEN (README: Keyless login)."`
	IDToken     string `envconfig:"TS_ID_TOKEN" desc:"Keyless login: the ID token (a JWT) itself. Prefer TS_ID_TOKEN_FILE, which the kubelet keeps fresh."`
	IDTokenFile string `envconfig:"TS_ID_TOKEN_FILE" desc:"Keyless login: path of the ID token, the pod's projected ServiceAccount token (components/keyless mounts it). Read only at first login, when the node state has no node key."`

	KubeSecret           string        `envconfig:"TS_KUBE_SECRET" desc:"Kubernetes Secret that holds the node state, in the pod's (or kubeconfig context's) namespace. Needed inside a cluster."`
	RelayService         string        `envconfig:"TS_RELAY_SERVICE" desc:"This relay's own Kubernetes Service, in the same namespace: its load-balancer IPs (or resolved hostnames), with each Service port that leads to the relay, are advertised as static endpoints, added to TS_RELAY_SERVER_STATIC_ENDPOINTS and updated as they change. The ports that lead to the relay are the UDP ones chosen by the first of these rules any port meets: targetPort TS_RELAY_SERVER_PORT (an absent targetPort is the port itself); targetPort TS_RELAY_SERVICE_PORT_NAME; named TS_RELAY_SERVICE_PORT_NAME with a named targetPort; the Service's only UDP port, with a named targetPort. Without one, /readyz lists the Service's ports."`
	RelayServicePortName string        `envconfig:"TS_RELAY_SERVICE_PORT_NAME" default:"relay" desc:"With TS_RELAY_SERVICE: the name of the relay's container port (TS_RELAY_SERVER_PORT), which a Service port's targetPort names; the Service port's own name may also be it. A port name: 1-15 lower-case letters, digits or '-', with a letter; empty means relay."`
	PodName              string        `envconfig:"POD_NAME" desc:"This pod's name, from the downward API: Kubernetes Events (login needed, relay bound, ...) are recorded on it. Empty: no Events."`
	PodNamespace         string        `envconfig:"POD_NAMESPACE" desc:"This pod's namespace, from the downward API; also where TS_KUBE_SECRET and TS_RELAY_SERVICE live."`
	PodUID               string        `envconfig:"POD_UID" desc:"This pod's UID, from the downward API, so that kubectl describe pod shows the Events."`
	LeaseDuration        time.Duration `envconfig:"TS_LEASE_DURATION" default:"90s" desc:"With TS_KUBE_SECRET: how long another pod waits, after this one stops renewing the Lease on the identity (it renews every 1/18 of this), before it takes the identity over. This one stops its node after 5/6 of it without a renewal, so an API-server outage shorter than that costs nothing. Whole seconds, from 6s to 1h."`
	StateDir             string        `envconfig:"TS_STATE_DIR" desc:"Directory for the node state when TS_KUBE_SECRET is empty; with TS_KUBE_SECRET only scratch files go here. Default: $XDG_CONFIG_HOME/tsrelay outside a cluster, $TMPDIR/tsrelay with TS_KUBE_SECRET."`

	RelayServerPort            Port      `envconfig:"TS_RELAY_SERVER_PORT" desc:"Required. UDP port the peer relay listens on, 1-65535 (1024 or above in an unprivileged pod)."`
	RelayServerStaticEndpoints Endpoints `envconfig:"TS_RELAY_SERVER_STATIC_ENDPOINTS" desc:"Comma-separated addresses peers can reach the relay on, ip:port or [ipv6]:port (e.g. a LoadBalancer IP, or a router's WAN IP and forwarded port)."`

	RelayServerSockets Sockets `envconfig:"TS_RELAY_SERVER_SOCKETS" default:"2" desc:"UDP sockets the peer relay binds per IP family, 1-16 (GOMAXPROCS is set to it). Each can hold 8 MiB of receive buffers once bulk traffic fills them: raise it for more relayed throughput on a node with spare cores, at that memory cost (README: Resources)."`

	WireGuardPort Port       `envconfig:"TS_PORT" default:"0" desc:"UDP port for this node's own WireGuard traffic; 0 picks a free one."`
	LocalAddrPort ListenAddr `envconfig:"TS_LOCAL_ADDR_PORT" default:"[::]:9002" desc:"ip:port for the HTTP server with /healthz, /readyz and /metrics."`

	LogFormat LogFormat `envconfig:"TS_LOG_FORMAT" default:"text" desc:"Log format: text (logfmt-style key=value) or json."`
	LogLevel  LogLevel  `envconfig:"TS_LOG_LEVEL" default:"info" desc:"Least severe log level shown: debug, info, warn or error."`

	NoLogsNoSupport bool `envconfig:"TS_NO_LOGS_NO_SUPPORT" default:"false" desc:"Do not upload Tailscale's diagnostic logs to Tailscale (their support then cannot see this node)."`
	BackendLogs     bool `envconfig:"TS_BACKEND_LOGS" default:"false" desc:"Include Tailscale's own verbose backend log in this process's log."`
	DebugPprof      bool `envconfig:"TS_DEBUG_PPROF" default:"false" desc:"Serve Go's profiler at /debug/pprof/ on TS_LOCAL_ADDR_PORT, for performance investigations. Anyone who reaches that address can then read the process's memory profile: turn it on only where that address is private."`

	// DERPConfig: the in-cluster DERP region (package derpregion), off by
	// default.
	DERPConfig

	// Version is tsrelay's version, set by main for build info; not read
	// from the environment.
	Version string `ignored:"true"`
}

// Port is a port number read from the environment (shared with the DERP
// region's settings).
type Port = envvar.Port

// ListenAddr is the ip:port of a TCP listener read from the environment.
type ListenAddr netip.AddrPort

// Decode implements envconfig.Decoder.
func (a *ListenAddr) Decode(s string) error {
	ap, err := netip.ParseAddrPort(strings.TrimSpace(s))
	if err != nil {
		return errors.New("want ip:port or [ipv6]:port (e.g. [::]:9002)")
	}
	*a = ListenAddr(ap)
	return nil
}

// Port returns the listener's port.
func (a ListenAddr) Port() uint16 { return netip.AddrPort(a).Port() }

// String returns the address in the form Decode accepts.
func (a ListenAddr) String() string { return netip.AddrPort(a).String() }

// Sockets is how many UDP sockets the peer relay binds per IP family.
type Sockets int

// MaxSockets is the most sockets per family Tailscale's relay server binds
// (see memtune.MaxSockets).
const MaxSockets = memtune.MaxSockets

// Decode implements envconfig.Decoder.
func (n *Sockets) Decode(s string) error {
	v, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || v < 1 || v > MaxSockets {
		return fmt.Errorf("want a whole number of sockets per IP family, 1-%d", MaxSockets)
	}
	*n = Sockets(v)
	return nil
}

// Endpoints is a comma-separated list of ip:port or [ipv6]:port.
type Endpoints []netip.AddrPort

// Decode implements envconfig.Decoder.
func (e *Endpoints) Decode(s string) error {
	var out Endpoints
	fields := strings.Split(s, ",")
	for _, f := range fields {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		ap, err := parseEndpoint(f)
		if err != nil {
			if len(fields) > 1 {
				err = fmt.Errorf("%s: %w", f, err)
			}
			return fmt.Errorf("%w; want comma-separated ip:port or [ipv6]:port with port 1-65535", err)
		}
		if !slices.Contains(out, ap) {
			out = append(out, ap)
		}
	}
	*e = out
	return nil
}

// String returns the endpoints in the form Decode accepts.
func (e Endpoints) String() string {
	s := make([]string, len(e))
	for i, ap := range e {
		s[i] = ap.String()
	}
	return strings.Join(s, ",")
}

// parseEndpoint parses one static endpoint. netip's own error for a bad port
// does not say what the limit is, and users have shipped ports like 81441, so
// the port is checked by hand.
func parseEndpoint(s string) (netip.AddrPort, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}, errors.New("missing port")
	}
	host, portStr := s[:i], s[i+1:]
	if strings.HasPrefix(host, "[") != strings.HasSuffix(host, "]") {
		return netip.AddrPort{}, errors.New("unbalanced brackets")
	}
	bracketed := strings.HasPrefix(host, "[")
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not an IP address", host)
	}
	if addr.Zone() != "" {
		return netip.AddrPort{}, errors.New("zoned IPv6 addresses cannot be reached by peers")
	}
	if addr.Is6() && !addr.Is4In6() && !bracketed {
		return netip.AddrPort{}, errors.New("IPv6 addresses need brackets")
	}
	addr = addr.Unmap()
	if addr.IsUnspecified() || addr.IsMulticast() {
		return netip.AddrPort{}, fmt.Errorf("%s is not a unicast address", addr)
	}
	port, err := strconv.ParseUint(portStr, 10, 64)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port %q is not a number", portStr)
	}
	if port < 1 || port > 65535 {
		return netip.AddrPort{}, fmt.Errorf("port %d out of range", port)
	}
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// LogFormat is how log lines are written: "text" or "json".
type LogFormat string

// Decode implements envconfig.Decoder.
func (f *LogFormat) Decode(s string) error {
	switch s := strings.ToLower(strings.TrimSpace(s)); s {
	case "", "text":
		*f = "text"
	case "json":
		*f = "json"
	default:
		return fmt.Errorf("unknown log format %q; want text or json", s)
	}
	return nil
}

// LogLevel is the least severe level logged.
type LogLevel slog.Level

// Decode implements envconfig.Decoder.
func (l *LogLevel) Decode(s string) error {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(strings.TrimSpace(s))); err != nil {
		return fmt.Errorf("unknown log level %q; want debug, info, warn or error", s)
	}
	*l = LogLevel(lv)
	return nil
}

// NewLogger returns the logger the settings ask for, writing to w.
func (c *Config) NewLogger(w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: slog.Level(c.LogLevel)}
	if c.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// Tags is a comma-separated list of ACL tags.
type Tags []string

// tagRE is the syntax control accepts for a tag name.
var tagRE = regexp.MustCompile(`^tag:[a-zA-Z][-a-zA-Z0-9]*$`)

// Decode implements envconfig.Decoder.
func (t *Tags) Decode(s string) error {
	var out Tags
	for _, f := range envvar.Fields(s) {
		if !tagRE.MatchString(f) {
			return fmt.Errorf("%q is not a tag; want comma-separated tag:name (a letter, then letters, digits or '-')", f)
		}
		if !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	*t = out
	return nil
}

// hostnameRE is a DNS label, which is what MagicDNS makes of the hostname.
var hostnameRE = regexp.MustCompile(`^[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?$`)

// secretNameRE is a Kubernetes object name (RFC 1123 subdomain).
var secretNameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

// defaultRelayPortName is what an empty TS_RELAY_SERVICE_PORT_NAME means:
// the name manifests/deployment.yaml gives the relay's container port. Keep
// it in step with the field's default tag, which relay --help shows.
const defaultRelayPortName = "relay"

// relayPortName returns TS_RELAY_SERVICE_PORT_NAME, or its default when it
// is empty (set but blank, or a Config built in code).
func (c *Config) relayPortName() string {
	if c.RelayServicePortName == "" {
		return defaultRelayPortName
	}
	return c.RelayServicePortName
}

// portNameRE is the shape of a container port name (IANA_SVC_NAME, RFC
// 6335): 1-15 lower-case letters, digits and '-', not at either end.
// validPortName adds the rest of the rule.
var portNameRE = regexp.MustCompile(`^(?:[a-z0-9]|[a-z0-9][-a-z0-9]{0,13}[a-z0-9])$`)

// validPortName reports whether s can name a container port, as the API
// server checks it: portNameRE, at least one letter, no "--".
func validPortName(s string) bool {
	return portNameRE.MatchString(s) && strings.ContainsAny(s, "abcdefghijklmnopqrstuvwxyz") && !strings.Contains(s, "--")
}

// serviceNameRE is a Kubernetes Service name (RFC 1035 label).
var serviceNameRE = regexp.MustCompile(`^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$`)

// LoadConfig reads the configuration from the environment and validates it.
// Every error names the variable, the bad value and the accepted form; the
// values of secret variables are never included. Every problem is reported,
// one per line: every variable that does not parse, and every problem
// Validate finds with the ones that do (a variable that failed to parse is
// not also reported as missing).
func LoadConfig() (Config, error) {
	var c Config
	errs, failed := envvar.Decode(&c)
	if c.AuthKey == "" {
		c.AuthKey = c.AuthKeyAlias
	}
	c.AuthKeyAlias = ""
	if verr := c.Validate(); verr != nil {
		for _, e := range envvar.Unjoin(verr) {
			if !slices.ContainsFunc(failed, func(k string) bool { return envvar.NamesVariable(e.Error(), k) }) {
				errs = append(errs, e)
			}
		}
	}
	if len(errs) > 0 {
		return c, errors.Join(errs...)
	}
	if err := c.setDefaults(); err != nil {
		return c, err
	}
	return c, nil
}

// inKubernetes reports whether this process runs in a Kubernetes pod.
func inKubernetes() bool { return os.Getenv("KUBERNETES_SERVICE_HOST") != "" }

// Validate checks the settings against each other and reports every problem
// at once.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if c.RelayServerPort == 0 {
		bad("TS_RELAY_SERVER_PORT is required: the UDP port the peer relay listens on, 1-65535 (e.g. TS_RELAY_SERVER_PORT=40000)")
	}
	if c.WireGuardPort != 0 && c.WireGuardPort == c.RelayServerPort {
		bad("TS_PORT=%d: must differ from TS_RELAY_SERVER_PORT, both are UDP sockets of this process; want another port, or 0 for automatic", c.WireGuardPort)
	}
	if c.AuthKey != "" && c.ClientSecret != "" {
		bad("TS_AUTHKEY and TS_CLIENT_SECRET are both set: want one of them, an auth key or an OAuth client secret")
	}
	if c.ClientSecret != "" && len(c.AdvertiseTags) == 0 {
		bad("TS_CLIENT_SECRET needs TS_ADVERTISE_TAGS: nodes created with an OAuth client must be tagged (e.g. TS_ADVERTISE_TAGS=tag:relay)")
	}
	if !hostnameRE.MatchString(c.Hostname) {
		bad("TS_HOSTNAME=%s: want a DNS label of 1-63 letters, digits or '-', not starting or ending with '-'", c.Hostname)
	}
	if c.ControlURL != "" {
		u, err := url.Parse(c.ControlURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("TS_CONTROL_URL=%s: want an http:// or https:// URL", c.ControlURL)
		}
	}
	if c.KubeSecret != "" && (len(c.KubeSecret) > 253 || !secretNameRE.MatchString(c.KubeSecret)) {
		bad("TS_KUBE_SECRET=%s: want a Kubernetes object name (lower-case letters, digits, '-' and '.')", c.KubeSecret)
	}
	if c.RelayService != "" && !serviceNameRE.MatchString(c.RelayService) {
		bad("TS_RELAY_SERVICE=%s: want a Service name (1-63 lower-case letters, digits or '-', starting with a letter)", c.RelayService)
	}
	if c.RelayServicePortName != "" && !validPortName(c.RelayServicePortName) {
		bad("TS_RELAY_SERVICE_PORT_NAME=%s: want a port name as in a container's ports (1-15 lower-case letters, digits or '-', with a letter, not starting or ending with '-', no '--'), e.g. relay", c.RelayServicePortName)
	}
	if c.KubeSecret == "" && c.StateDir == "" && inKubernetes() {
		bad("TS_KUBE_SECRET is empty inside Kubernetes: the node's identity would die with the pod; set TS_KUBE_SECRET to a Secret name (or TS_STATE_DIR to a persistent volume)")
	}
	if err := c.DERPConfig.Validate(c.derpHost()); err != nil {
		errs = append(errs, envvar.Unjoin(err)...)
	}
	errs = append(errs, c.keylessSettings().Validate()...)
	// Tailscale advertises at most lbaddr.MaxEndpoints; cutting the
	// user's own list silently would hide which ones peers never hear of.
	if n := len(c.RelayServerStaticEndpoints); n > lbaddr.MaxEndpoints {
		bad("TS_RELAY_SERVER_STATIC_ENDPOINTS: %d distinct endpoints, more than the %d a relay advertises; want at most %d", n, lbaddr.MaxEndpoints, lbaddr.MaxEndpoints)
	} else if n == lbaddr.MaxEndpoints && c.RelayService != "" {
		bad("TS_RELAY_SERVER_STATIC_ENDPOINTS: %d endpoints leave no room for TS_RELAY_SERVICE=%s's addresses (a relay advertises at most %d, explicit ones first); want at most %d with TS_RELAY_SERVICE", n, c.RelayService, lbaddr.MaxEndpoints, lbaddr.MaxEndpoints-1)
	}
	if c.LeaseDuration < minLeaseDuration || c.LeaseDuration > maxLeaseDuration || c.LeaseDuration%time.Second != 0 {
		bad("TS_LEASE_DURATION=%s: want whole seconds from 6s to 1h (e.g. 90s)", c.LeaseDuration)
	}
	if err := checkStateDir(c.StateDir); err != nil {
		bad("TS_STATE_DIR=%s: %v; want a directory this process can create or write", c.StateDir, err)
	}
	return errors.Join(errs...)
}

// keylessSettings returns keyless login's settings, for package keyless.
func (c *Config) keylessSettings() keyless.Settings {
	return keyless.Settings{
		ClientID: c.ClientID, IDToken: c.IDToken, IDTokenFile: c.IDTokenFile,
		Tags: c.AdvertiseTags, ControlURL: c.ControlURL,
		AuthKeySet: c.AuthKey != "", ClientSecretSet: c.ClientSecret != "",
	}
}

// checkStateDir checks that dir (if set) is a directory or could be made
// one: it exists as a directory, or its nearest existing ancestor is one.
// Otherwise tsnet would fail later with an error that does not name the
// variable (e.g. "mkdir /etc/hostname: not a directory").
func checkStateDir(dir string) error {
	if dir == "" {
		return nil
	}
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		switch {
		case err == nil && fi.IsDir():
			return nil
		case err == nil && p == filepath.Clean(dir):
			return errors.New("not a directory")
		case err == nil:
			return fmt.Errorf("%s is not a directory", p)
		case !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR):
			return err
		}
		if filepath.Dir(p) == p {
			return nil
		}
	}
}

// setDefaults fills in the defaults that depend on the machine.
func (c *Config) setDefaults() error {
	if c.StateDir != "" {
		return nil
	}
	if c.KubeSecret != "" {
		c.StateDir = filepath.Join(os.TempDir(), "tsrelay")
		return nil
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return fmt.Errorf("TS_STATE_DIR is empty and there is no default (%w): set TS_STATE_DIR to a directory", err)
	}
	c.StateDir = filepath.Join(dir, "tsrelay")
	return nil
}

// PrintUsage writes every environment variable with its default and
// meaning, read from Config's struct tags (the DERP region's included).
func PrintUsage(w io.Writer) error { return envvar.Usage[Config](w) }
