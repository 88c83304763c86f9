package tailnettest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// stopGrace is how long Close lets a process shut down after SIGTERM before
// killing it. tailscaled and the relay exit in well under a second; the
// margin is for a loaded 2-core CI machine.
const stopGrace = 10 * time.Second

// ProcessConfig describes a child process for StartProcess.
type ProcessConfig struct {
	// Name labels the process in errors, e.g. "tailscaled[a]".
	Name string
	// Path is the executable.
	Path string
	// Args are the arguments, without the program name.
	Args []string
	// Env is added to the inherited environment, from which every TS_*
	// variable has been removed so that a developer's shell (TS_AUTHKEY,
	// TS_DEBUG_*) cannot leak into the tailnet. Later entries win.
	Env []string
	// Dir is the working directory; empty means the caller's.
	Dir string
	// Netns, if set, is a named network namespace (`ip netns add`) to run
	// the process in, through `ip netns exec`, which execs the program: Pid
	// is still the program's.
	Netns string
	// NetnsPath, if set, is a network namespace file (/run/netns/NAME, or
	// /proc/PID/ns/net) to start the process in, entered with setns(2)
	// alone. Unlike Netns, which also gives the process a mount namespace
	// of its own, the process shares the caller's mounts: a kubelet and its
	// container runtime must see each other's. Linux only.
	NetnsPath string
	// LogFile receives stdout and stderr (created, or appended to). Required:
	// it is what LogTail reads.
	LogFile string
	// Output, if set, also receives stdout and stderr, e.g. os.Stderr for a
	// demo.
	Output io.Writer
}

// Process is a running child process started by StartProcess. Its output
// goes to a log file, and it dies with the calling process: on Linux through
// Pdeathsig, and for tailscaled also through TS_PARENT_DEATH_FD.
type Process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	logFile *os.File
	// deathPipe is the write end of the pipe passed to the child as fd 3
	// (TS_PARENT_DEATH_FD). tailscaled exits when it becomes readable, which
	// happens when this process exits or the pipe is closed.
	deathPipe *os.File

	done    chan struct{} // closed when the process has exited
	waitErr error         // the exit status; valid once done is closed
}

// StartProcess starts the process cfg describes and returns without waiting
// for it to become ready.
//
// ctx only bounds the start: the process runs until Stop or Close, or until
// the calling process exits. It is put in its own process group so that a
// terminal's Ctrl-C reaches only the caller, which then stops its children in
// order.
func StartProcess(ctx context.Context, cfg ProcessConfig) (*Process, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cfg.Name, err)
	}
	if cfg.LogFile == "" {
		return nil, fmt.Errorf("start %s: no log file", cfg.Name)
	}
	logFile, err := os.OpenFile(cfg.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: open log: %w", cfg.Name, err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: death pipe: %w", cfg.Name, err)
	}
	// The child has its own copy of the read end after Start.
	defer pr.Close()

	cmd := exec.Command(cfg.Path, cfg.Args...)
	if cfg.Netns != "" {
		cmd = exec.Command("ip", append([]string{"netns", "exec", cfg.Netns, cfg.Path}, cfg.Args...)...)
	}
	cmd.Dir = cfg.Dir
	cmd.Env = append(append(scrubbedEnviron(), "TS_PARENT_DEATH_FD=3"), cfg.Env...)
	var out io.Writer = logFile
	if cfg.Output != nil {
		out = io.MultiWriter(logFile, cfg.Output)
	}
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.ExtraFiles = []*os.File{pr} // fd 3
	cmd.SysProcAttr = sysProcAttr()
	// With Output set, Wait copies through a pipe; don't let a grandchild
	// holding it open block Wait forever.
	cmd.WaitDelay = stopGrace
	if err := startIn(cfg.NetnsPath, cmd); err != nil {
		logFile.Close()
		pw.Close()
		return nil, fmt.Errorf("start %s: %w", cfg.Name, err)
	}

	p := &Process{
		name:      cfg.Name,
		cmd:       cmd,
		logPath:   cfg.LogFile,
		logFile:   logFile,
		deathPipe: pw,
		done:      make(chan struct{}),
	}
	go func() {
		p.waitErr = cmd.Wait()
		p.logFile.Close()
		p.deathPipe.Close()
		close(p.done)
	}()
	return p, nil
}

// scrubbedEnviron returns the caller's environment without TS_* variables.
func scrubbedEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "TS_") {
			env = append(env, kv)
		}
	}
	return env
}

// Name returns the label given in ProcessConfig.Name.
func (p *Process) Name() string { return p.name }

// Pid returns the process ID.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// LogPath returns the file that holds the process's output.
func (p *Process) LogPath() string { return p.logPath }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit and returns its exit status (nil for
// exit code 0), or ctx's error if ctx ends first.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.exitErr()
	case <-ctx.Done():
		return fmt.Errorf("wait for %s to exit: %w", p.name, context.Cause(ctx))
	}
}

func (p *Process) exitErr() error {
	if p.waitErr != nil {
		return fmt.Errorf("%s: %w", p.name, p.waitErr)
	}
	return nil
}

// Stop sends SIGTERM to the process (and its process group) and waits for
// it to exit; if ctx ends first it kills the group. It returns the exit status (nil for exit code 0), or an
// error saying the process had to be killed. A program that does not handle
// SIGTERM reports "signal: terminated"; tailscaled exits 0. Stopping an exited process just
// returns its exit status.
func (p *Process) Stop(ctx context.Context) error {
	select {
	case <-p.done:
		return p.exitErr()
	default:
	}
	if err := p.signalGroup(syscall.SIGTERM); err != nil {
		return fmt.Errorf("stop %s: %w", p.name, err)
	}
	select {
	case <-p.done:
		return p.exitErr()
	case <-ctx.Done():
	}
	p.signalGroup(syscall.SIGKILL)
	<-p.done
	return fmt.Errorf("stop %s: killed after SIGTERM was not enough (%w)", p.name, context.Cause(ctx))
}

// Kill kills the process and its group with SIGKILL, as the kernel's OOM
// killer or a lost node would, and waits for it to exit.
func (p *Process) Kill() {
	p.signalGroup(syscall.SIGKILL)
	<-p.done
}

// signalGroup sends sig to the process's group (StartProcess made it a group
// leader), so that any children it started get it too.
func (p *Process) signalGroup(sig syscall.Signal) error {
	err := syscall.Kill(-p.cmd.Process.Pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil // already gone
	}
	return err
}

// Close stops the process, giving it 10 s to exit after SIGTERM.
func (p *Process) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), stopGrace)
	defer cancel()
	return p.Stop(ctx)
}

// LogTail returns the last n lines of the process's log, for failure
// messages. It returns a note instead if the log cannot be read.
func (p *Process) LogTail(n int) string {
	return logTail(p.logPath, n)
}

func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	b = bytes.TrimRight(b, "\n")
	if n <= 0 {
		return ""
	}
	i := len(b)
	for range n {
		j := bytes.LastIndexByte(b[:i], '\n')
		if j < 0 {
			i = 0
			break
		}
		i = j
	}
	return strings.TrimPrefix(string(b[i:]), "\n")
}
