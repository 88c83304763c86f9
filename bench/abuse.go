package bench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/tsrelay/tsrelay/internal/tailnettest"
)

// abuseCase is one attack on the relay's HTTP port: conns connections at
// once, each sending header bytes of a request header it never finishes.
type abuseCase struct {
	Conns       int
	HeaderBytes int
}

// abuseCases are the attacks the footprint section measures: headers the
// server must hold (under its 4 KiB limit), and the 1 MB headers that
// OOM-killed a relay with 256 MiB before the limits (issue 17). The goal:
// under 32 MiB extra at 1,000 connections.
func (b *bench) abuseCases() []abuseCase {
	if b.cfg.Smoke {
		return []abuseCase{{200, 3 << 10}, {100, 1 << 20}}
	}
	return []abuseCase{{1000, 3 << 10}, {200, 1 << 20}, {1000, 1 << 20}}
}

// abuseResult is what one abuseCase measured.
type abuseResult struct {
	abuseCase
	IdleKiB, PeakKiB int64
	// Healthz is how long /healthz took to answer with every connection
	// open, in seconds (-1: it did not answer).
	Healthz float64
}

// runHTTPAbuse starts a fresh relay for each case (so one case's retained
// memory does not count in the next), waits until it is ready, opens the
// case's connections to its HTTP port and samples its RSS until every
// connection has sent its header or been refused; then asks /healthz.
func (b *bench) runHTTPAbuse(ctx context.Context, dir string) ([]abuseResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	tn, err := b.newTailnet(dir)
	if err != nil {
		return nil, err
	}
	defer tn.close()
	rp, err := tn.pod(ctx, "relay", podMTU)
	if err != nil {
		return nil, err
	}
	var out []abuseResult
	for i, c := range b.abuseCases() {
		r, err := tn.startTSRelay(ctx, rp, filepath.Join(dir, "relay-"+strconv.Itoa(i)), true)
		if err != nil {
			return out, err
		}
		res, err := abuse(ctx, r, c)
		r.Close()
		if err != nil {
			return out, fmt.Errorf("%d connections × %d bytes: %w", c.Conns, c.HeaderBytes, err)
		}
		out = append(out, res)
	}
	return out, nil
}

func abuse(ctx context.Context, r *tailnettest.Relay, c abuseCase) (abuseResult, error) {
	res := abuseResult{abuseCase: c, Healthz: -1}
	if err := waitReadyz(ctx, r); err != nil {
		return res, err
	}
	idle, err := rssKiB(r.Pid())
	if err != nil {
		return res, err
	}
	res.IdleKiB, res.PeakKiB = idle, idle

	// Sample RSS while the attack runs.
	sampleCtx, stopSampling := context.WithCancel(ctx)
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			if kib, err := rssKiB(r.Pid()); err == nil {
				res.PeakKiB = max(res.PeakKiB, kib)
			}
			select {
			case <-sampleCtx.Done():
				return
			case <-t.C:
			}
		}
	}()

	header := append([]byte("GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Pad: "), bytes.Repeat([]byte("a"), c.HeaderBytes)...)
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	defer func() {
		for _, cn := range conns {
			cn.Close()
		}
	}()
	dialCtx, cancelDial := context.WithTimeout(ctx, time.Minute)
	defer cancelDial()
	for range c.Conns {
		wg.Go(func() {
			cn, err := tailnettest.DialInNetns(dialCtx, r.Netns, "tcp", r.HTTPAddr)
			if err != nil {
				return // counted below as not held
			}
			mu.Lock()
			conns = append(conns, cn)
			mu.Unlock()
			cn.SetWriteDeadline(time.Now().Add(30 * time.Second))
			cn.Write(header) // fails once the server refuses a big header
		})
	}
	wg.Wait()
	t0 := time.Now()
	hctx, cancelH := context.WithTimeout(ctx, 10*time.Second)
	code, _, err := r.Get(hctx, "/healthz")
	cancelH()
	if err == nil && code == 200 {
		res.Healthz = time.Since(t0).Seconds()
	}
	stopSampling()
	<-sampled
	if len(conns) < c.Conns {
		return res, fmt.Errorf("only %d of %d connections opened", len(conns), c.Conns)
	}
	return res, nil
}
