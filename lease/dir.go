package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// LockFile is the file in a state directory that LockDir locks.
const LockFile = "tsrelay.lock"

// dirPollInterval is how often a waiting LockDir tries the lock again. A
// lock on a local file is released the instant its holder exits, so this is
// the whole takeover time.
const dirPollInterval = 500 * time.Millisecond

// DirLock is an exclusive lock on a state directory, held by this process
// until Unlock or exit. The kernel drops it when the process dies, however it
// dies, so there is nothing to expire.
type DirLock struct {
	f *os.File
}

// LockDir takes an exclusive lock (flock) on LockFile in dir, creating both
// if need be, and writes identity into the file so that a waiting process
// can say who holds it. While another process holds the lock, LockDir waits,
// trying again every half second, calling onWait (if set) with the holder's
// identity when it starts waiting; it returns when it holds the lock or ctx
// is done.
//
// It is the state directory's counterpart of a Lease: two processes started
// with one TS_STATE_DIR never run its node at the same time. It holds only
// for processes on one machine sharing the directory (and on network file
// systems only where flock works across clients).
func LockDir(ctx context.Context, dir, identity string, logger *slog.Logger, onWait func(holder string)) (*DirLock, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	}
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state directory lock: %w", err)
	}
	waiting := false
	for {
		err := tryLock(f)
		if err == nil {
			break
		}
		if !errors.Is(err, errLocked) {
			f.Close()
			return nil, fmt.Errorf("state directory lock %s: %w", path, err)
		}
		if !waiting {
			waiting = true
			holder := readHolder(path)
			logger.Info("state directory locked by another process; waiting", "dir", dir, "holder", holder)
			if onWait != nil {
				onWait(holder)
			}
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("state directory lock %s: %w", path, context.Cause(ctx))
		case <-time.After(dirPollInterval):
		}
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, fmt.Errorf("state directory lock %s: %w", path, err)
	}
	if _, err := f.WriteAt([]byte(identity+"\n"), 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("state directory lock %s: %w", path, err)
	}
	logger.Info("state directory locked", "dir", dir, "identity", identity)
	return &DirLock{f: f}, nil
}

// Unlock releases the lock. The file stays: removing it would let a waiter
// lock a file that a third process then recreates and locks too.
func (d *DirLock) Unlock() error {
	if err := d.f.Truncate(0); err != nil {
		d.f.Close()
		return fmt.Errorf("state directory unlock: %w", err)
	}
	if err := d.f.Close(); err != nil {
		return fmt.Errorf("state directory unlock: %w", err)
	}
	return nil
}

// readHolder returns the identity the holder wrote, or "unknown".
func readHolder(path string) string {
	b, err := os.ReadFile(path)
	if h := strings.TrimSpace(string(b)); err == nil && h != "" {
		return h
	}
	return "unknown"
}
