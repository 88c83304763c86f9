//go:build !unix

package lease

import (
	"errors"
	"os"
)

// errLocked means another open file holds the lock.
var errLocked = errors.New("locked by another process")

// tryLock fails: this platform has no flock, and a state directory without
// a lock could be run by two processes at once.
func tryLock(*os.File) error {
	return errors.New("locking a state directory is not supported on this platform")
}
