// Package udpsock counts the UDP sockets a process has bound on a port, from
// Linux's /proc: the socket inodes among the process's open files, matched
// against the UDP tables of its network namespace. The relay exports the
// count as a metric, and tests use it to check the real binary, because how
// many sockets Tailscale's relay server binds is decided inside Tailscale
// (min(16, GOMAXPROCS) per address family at v1.102.5).
package udpsock

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Counts is how many UDP sockets are bound on one port, by address family.
type Counts struct {
	IPv4, IPv6 int
}

// Count returns how many UDP sockets process pid holds bound on port, read
// from /proc/<pid>/fd and /proc/<pid>/net/udp{,6}. pid 0 means this process.
func Count(pid, port int) (Counts, error) {
	dir := "/proc/self"
	if pid != 0 {
		dir = "/proc/" + strconv.Itoa(pid)
	}
	inodes, err := socketInodes(filepath.Join(dir, "fd"))
	if err != nil {
		return Counts{}, err
	}
	var c Counts
	for _, t := range []struct {
		file string
		n    *int
	}{{"udp", &c.IPv4}, {"udp6", &c.IPv6}} {
		f, err := os.Open(filepath.Join(dir, "net", t.file))
		if errors.Is(err, os.ErrNotExist) && t.file == "udp6" {
			continue // IPv6 disabled in this kernel
		}
		if err != nil {
			return Counts{}, fmt.Errorf("count UDP sockets on port %d: %w", port, err)
		}
		*t.n, err = countTable(f, port, inodes)
		f.Close()
		if err != nil {
			return Counts{}, fmt.Errorf("count UDP sockets on port %d: read %s: %w", port, f.Name(), err)
		}
	}
	return c, nil
}

// socketInodes returns the inodes of the sockets among the open files
// listed in fdDir (their links read "socket:[<inode>]").
func socketInodes(fdDir string) (map[string]bool, error) {
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, fmt.Errorf("list open files: %w", err)
	}
	inodes := map[string]bool{}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(fdDir, e.Name()))
		if err != nil {
			continue // closed since ReadDir
		}
		if ino, ok := strings.CutPrefix(link, "socket:["); ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	return inodes, nil
}

// countTable counts the rows of a /proc/net/udp{,6} table whose local port
// is port and whose inode is in inodes. A row reads
//
//	sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
//
// with the local address as hex IP, a colon and the hex port.
func countTable(r io.Reader, port int, inodes map[string]bool) (int, error) {
	want := fmt.Sprintf(":%04X", port)
	sc := bufio.NewScanner(r)
	n := 0
	for first := true; sc.Scan(); first = false {
		f := strings.Fields(sc.Text())
		if first || len(f) < 10 {
			continue // the header
		}
		if strings.HasSuffix(f[1], want) && inodes[f[9]] {
			n++
		}
	}
	return n, sc.Err()
}
