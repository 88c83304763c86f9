package bench

import (
	"time"

	"tailscale.com/types/logger"
)

// Config says what to run.
type Config struct {
	// Smoke runs a seconds-long subset: the tsrelay path with one pair and
	// its RSS, tsrelay readiness, the HTTP port abuse at smaller counts,
	// one failover trial (the first case but drain and mesh, two relays)
	// and the sizes, with 1 s transfers and 10 pings.
	Smoke bool
	// BinDir holds the binaries Build made: relay, tailscaled, tailscale
	// and, if it was built, containerboot.
	BinDir string
	// WorkDir holds the nodes' state and logs; empty means a new
	// temporary directory, removed at the end.
	WorkDir string
	// Transfer is how long each iperf3 run sends (whole seconds); Pings
	// how many ICMP pings each RTT figure is made of. Zero means the mode's
	// default.
	Transfer time.Duration
	Pings    int
	// Rounds is how many times each throughput transfer, each readiness
	// measurement and each DERP first pong (a fresh pair each) runs, and
	// the flood's transfers; the report shows the median. Zero means 3 (1
	// with Smoke).
	Rounds int
	// Pairs are the numbers of laptop pairs sending through a relay at
	// once for the memory-under-load rows; the DERP section's load run
	// uses the first. Nil means 1, 4 and 8 (1 with Smoke).
	Pairs []int
	// SmallMTU is the pod link MTU of the MTU row (tsrelay behind a pod
	// network that is itself a tunnel; see README's MTU section). Zero
	// means 1230; the row is skipped with Smoke.
	SmallMTU int
	// ProfileDir, if set, receives profiles of tsrelay (TS_DEBUG_PPROF):
	// its heap when idle and after the load, and its CPU while k pairs
	// send through it. Read them with `go tool pprof`.
	ProfileDir string
	// Levers are extra tsrelay configurations for the footprint rows, each
	// a list of environment settings (e.g. GOGC=50), measured like the
	// default and compared with it in the same run.
	Levers [][]string
	// FootprintOnly runs only the relayed scenarios (paths through each
	// relay variant but the IPv6 one, idle and loaded RSS), the HTTP port
	// abuse and the sizes: no direct or DERP path, MTU row, DERP section,
	// failover, readiness or DERP port abuse.
	FootprintOnly bool
	// NoFailover skips the failover section; FailoverOnly runs it alone
	// (and the sizes).
	NoFailover, FailoverOnly bool
	// FailoverCases are the failover cases to run (CaseKill, CaseTerm,
	// CaseNode, CaseDrain, CaseMesh); nil means all. With Smoke only the
	// first that is neither CaseDrain nor CaseMesh runs, once, with two
	// relays.
	FailoverCases []string
	// FailoverReps is how many trials each failover case gets per
	// topology; zero means 3.
	FailoverReps int
	// FailoverWindow is how long a failover trial waits for the pair to
	// ride a relay again (after the drain, for CaseDrain; for CaseMesh, to
	// be answered again after a node failure); zero means 60 s.
	FailoverWindow time.Duration
	// FailoverDrain is CaseDrain's delay between the event and the
	// SIGTERM; zero means 65 s, longer than magicsock's
	// upgradeUDPRelayInterval (1 min), so that peers riding the draining
	// relay rediscover relay paths once during it.
	FailoverDrain time.Duration
	// AbuseOnly runs only the abuse sections (the HTTP port's and the
	// DERP port's, with the UDP flood; with Smoke only the HTTP port's)
	// and the sizes.
	AbuseOnly bool
	// AbuseEnv is extra relay settings for the DERP abuse section (e.g.
	// TS_DERP_ACCEPT_RATE=100000, to measure what the other limits hold).
	AbuseEnv []string
	// Logf receives progress; nil discards it.
	Logf logger.Logf
}

func (c *Config) defaults() {
	if c.Logf == nil {
		c.Logf = logger.Discard
	}
	if c.Transfer == 0 {
		c.Transfer = 5 * time.Second
		if c.Smoke {
			c.Transfer = time.Second
		}
	}
	c.Transfer = max(c.Transfer.Truncate(time.Second), time.Second)
	if c.Rounds == 0 {
		c.Rounds = 3
		if c.Smoke {
			c.Rounds = 1
		}
	}
	if c.Pings == 0 {
		c.Pings = 200
		if c.Smoke {
			c.Pings = 10
		}
	}
	if c.Pairs == nil {
		c.Pairs = []int{1, 4, 8}
		if c.Smoke {
			c.Pairs = []int{1}
		}
	}
	if c.SmallMTU == 0 {
		c.SmallMTU = 1230
	}
	if c.FailoverCases == nil {
		c.FailoverCases = failoverCases
	}
	if c.FailoverReps == 0 {
		c.FailoverReps = 3
	}
	if c.FailoverWindow == 0 {
		c.FailoverWindow = time.Minute
	}
	if c.FailoverDrain == 0 {
		c.FailoverDrain = 65 * time.Second
	}
}

// When a section runs (sections' when). FailoverOnly and AbuseOnly each
// leave out every section but their own (and the sizes); Smoke and
// FootprintOnly leave out the long sections; NoFailover the failover one.

// always: every run.
func (c *Config) always() bool { return true }

// unlimited: every run that no -only flag limits to another section.
func (c *Config) unlimited() bool { return !c.FailoverOnly && !c.AbuseOnly }

// full: an unlimited run that is neither Smoke nor FootprintOnly.
func (c *Config) full() bool { return c.unlimited() && !c.Smoke && !c.FootprintOnly }

// notFootprint: an unlimited run, smoke included, that is not FootprintOnly.
func (c *Config) notFootprint() bool { return c.unlimited() && !c.FootprintOnly }

// failover: every run but NoFailover, FootprintOnly and AbuseOnly ones.
func (c *Config) failover() bool { return !c.NoFailover && !c.FootprintOnly && !c.AbuseOnly }

// abuse: an unlimited run or an AbuseOnly one.
func (c *Config) abuse() bool { return c.unlimited() || c.AbuseOnly }

// fullAbuse: an abuse run that is neither Smoke nor FootprintOnly.
func (c *Config) fullAbuse() bool { return c.abuse() && !c.Smoke && !c.FootprintOnly }
