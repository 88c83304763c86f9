// Package udpsock finds the UDP sockets a process has bound on a port, from
// Linux's /proc: the socket inodes among the process's open files, matched
// against the UDP tables of its network namespace. The relay exports their
// count and drops as metrics and attaches a socket filter to its own
// (relayserver), and tests use it to check the real binary, because how many
// sockets Tailscale's relay server binds, and where, is decided inside
// Tailscale (min(16, GOMAXPROCS) per address family at v1.102.5).
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

// Socket is one UDP socket a process holds bound on a port.
type Socket struct {
	// FD is the socket's file descriptor in the process that holds it.
	FD int
	// Inode is the socket's inode number, which names it in /proc.
	Inode uint64
	// IPv6 says it is in the IPv6 table (an AF_INET6 socket).
	IPv6 bool
	// Drops counts the datagrams the kernel dropped for this socket: its
	// receive buffer was full, or its socket filter refused them.
	Drops uint64
}

// Counts is how many UDP sockets are bound on one port, by address family.
type Counts struct {
	IPv4, IPv6 int
}

// Count returns how many UDP sockets process pid holds bound on port, read
// from /proc/<pid>/fd and /proc/<pid>/net/udp{,6}. pid 0 means this process.
func Count(pid, port int) (Counts, error) {
	socks, err := List(pid, port)
	if err != nil {
		return Counts{}, err
	}
	var c Counts
	for _, s := range socks {
		if s.IPv6 {
			c.IPv6++
		} else {
			c.IPv4++
		}
	}
	return c, nil
}

// List returns the UDP sockets process pid holds bound on port, IPv4 first,
// read from /proc/<pid>/fd and /proc/<pid>/net/udp{,6}. pid 0 means this
// process.
func List(pid, port int) ([]Socket, error) {
	dir := "/proc/self"
	if pid != 0 {
		dir = "/proc/" + strconv.Itoa(pid)
	}
	fds, err := socketFDs(filepath.Join(dir, "fd"))
	if err != nil {
		return nil, err
	}
	var socks []Socket
	for _, table := range []string{"udp", "udp6"} {
		f, err := os.Open(filepath.Join(dir, "net", table))
		if errors.Is(err, os.ErrNotExist) && table == "udp6" {
			continue // IPv6 disabled in this kernel
		}
		if err != nil {
			return nil, fmt.Errorf("list UDP sockets on port %d: %w", port, err)
		}
		socks, err = readTable(f, port, fds, table == "udp6", socks)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("list UDP sockets on port %d: read %s: %w", port, f.Name(), err)
		}
	}
	return socks, nil
}

// socketFDs returns the file descriptors of the sockets among the open
// files listed in fdDir (their links read "socket:[<inode>]"), by inode.
func socketFDs(fdDir string) (map[uint64]int, error) {
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, fmt.Errorf("list open files: %w", err)
	}
	fds := map[uint64]int{}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink(filepath.Join(fdDir, e.Name()))
		if err != nil {
			continue // closed since ReadDir
		}
		if s, ok := strings.CutPrefix(link, "socket:["); ok {
			if ino, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64); err == nil {
				fds[ino] = fd
			}
		}
	}
	return fds, nil
}

// readTable appends to socks the rows of a /proc/net/udp{,6} table whose
// local port is port and whose inode is in fds. A row reads
//
//	sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ref pointer drops
//
// with the local address as hex IP, a colon and the hex port.
func readTable(r io.Reader, port int, fds map[uint64]int, ipv6 bool, socks []Socket) ([]Socket, error) {
	want := fmt.Sprintf(":%04X", port)
	sc := bufio.NewScanner(r)
	for first := true; sc.Scan(); first = false {
		f := strings.Fields(sc.Text())
		if first || len(f) < 13 {
			continue // the header
		}
		if !strings.HasSuffix(f[1], want) {
			continue
		}
		ino, err := strconv.ParseUint(f[9], 10, 64)
		if err != nil {
			return socks, fmt.Errorf("inode %q: %w", f[9], err)
		}
		fd, ok := fds[ino]
		if !ok {
			continue
		}
		drops, err := strconv.ParseUint(f[12], 10, 64)
		if err != nil {
			return socks, fmt.Errorf("socket %s: drops %q: %w", f[9], f[12], err)
		}
		socks = append(socks, Socket{FD: fd, Inode: ino, IPv6: ipv6, Drops: drops})
	}
	return socks, sc.Err()
}
