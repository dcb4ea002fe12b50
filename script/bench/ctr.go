package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// ctrClient runs ctr against one containerd.
type ctrClient struct {
	bin      string
	sock     string
	hostsDir string
	env      []string
}

func (c ctrClient) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, c.bin, append([]string{"--address", c.sock}, args...)...)
	cmd.Env = c.env
	// Not in the terminal's process group: ^C stops the bench, which
	// then stops its containers in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// output runs ctr and returns its standard output; the error holds its
// standard error.
func (c ctrClient) output(ctx context.Context, args ...string) (string, error) {
	cmd := c.command(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, lastLines(stderr.String(), 5))
	}
	return stdout.String(), nil
}

// pull pulls ref for snapshotter through containerd's transfer service.
func (c ctrClient) pull(ctx context.Context, snapshotter, ref string) error {
	_, err := c.output(ctx, "image", "pull", "--snapshotter", snapshotter, "--hosts-dir", c.hostsDir, ref)
	return err
}

// container is a running `ctr run` whose output lines are read as they
// come, each with the time it was read.
type container struct {
	id    string
	cmd   *exec.Cmd
	lines chan line // closed when the output ends
	done  chan struct{}
	err   error // ctr run's exit; read after done is closed
}

type line struct {
	at   time.Time
	text string
}

// run starts `ctr run --rm` of ref as container id with snapshotter,
// running script with sh. The container lives until kill.
func (c ctrClient) run(ctx context.Context, snapshotter, ref, id, script string) (*container, error) {
	cmd := c.command(ctx, "run", "--rm", "--snapshotter", snapshotter, ref, id, "sh", "-c", script)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start ctr run %s: %w", id, err)
	}
	ct := &container{id: id, cmd: cmd, lines: make(chan line, 64), done: make(chan struct{})}
	go func() {
		readLines(stdout, ct.lines)
		ct.err = cmd.Wait()
		if ct.err != nil {
			ct.err = fmt.Errorf("ctr run %s: %w: %s", id, ct.err, lastLines(stderr.String(), 5))
		}
		close(ct.done)
	}()
	return ct, nil
}

// readLines sends each line of r, stamped when read, and closes out.
func readLines(r io.Reader, out chan<- line) {
	defer close(out)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		out <- line{at: time.Now(), text: sc.Text()}
	}
}

// next returns the container's next output line, failing if the
// container ends first or timeout passes.
func (ct *container) next(ctx context.Context, timeout time.Duration) (line, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case l, ok := <-ct.lines:
		if ok {
			return l, nil
		}
		<-ct.done
		if ct.err != nil {
			return line{}, ct.err
		}
		return line{}, fmt.Errorf("container %s ended without the expected output", ct.id)
	case <-t.C:
		return line{}, fmt.Errorf("container %s: no output within %v", ct.id, timeout)
	case <-ctx.Done():
		return line{}, ctx.Err()
	}
}

// kill kills the container's task and waits for `ctr run --rm` to remove
// it; if ctr does not end, it is killed by PID and the container removed.
func (c ctrClient) kill(ct *container) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c.output(ctx, "task", "kill", "-s", "KILL", ct.id)
	select {
	case <-ct.done:
		return nil
	case <-time.After(20 * time.Second):
	}
	ct.cmd.Process.Kill()
	<-ct.done
	return c.removeAll(ctx)
}

// exec runs script in the running container id and returns the time from
// its first output line to its last; the script's own output is returned
// without those two marker lines. Timing on marker lines leaves out the
// cost of starting the exec.
func (c ctrClient) exec(ctx context.Context, id, execID, script string) (time.Duration, []string, error) {
	const start, end = "@@bench-start", "@@bench-end"
	full := fmt.Sprintf("echo %s; %s; echo %s", start, script, end)
	cmd := c.command(ctx, "task", "exec", "--exec-id", execID, id, "sh", "-c", full)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, nil, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return 0, nil, fmt.Errorf("start ctr task exec: %w", err)
	}
	lines := make(chan line, 64)
	go readLines(stdout, lines)
	var t0, t1 time.Time
	var out []string
	for l := range lines {
		switch {
		case l.text == start:
			t0 = l.at
		case l.text == end:
			t1 = l.at
		default:
			out = append(out, l.text)
		}
	}
	if err := cmd.Wait(); err != nil {
		return 0, out, fmt.Errorf("exec %q in %s: %w: %s", script, id, err, lastLines(stderr.String(), 5))
	}
	if t0.IsZero() || t1.IsZero() {
		return 0, out, fmt.Errorf("exec %q in %s: marker lines missing (script failed?): %s", script, id, lastLines(stderr.String(), 5))
	}
	return t1.Sub(t0), out, nil
}

// removeAll kills every task and removes every container.
func (c ctrClient) removeAll(ctx context.Context) error {
	tasks := func() []string {
		out, _ := c.output(ctx, "task", "ls", "-q")
		return strings.Fields(out)
	}
	for _, id := range tasks() {
		c.output(ctx, "task", "kill", "-s", "KILL", id)
	}
	deadline := time.Now().Add(20 * time.Second)
	for left := tasks(); len(left) > 0; left = tasks() {
		if time.Now().After(deadline) {
			return fmt.Errorf("tasks still running: %v", left)
		}
		for _, id := range left {
			c.output(ctx, "task", "rm", "-f", id)
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, _ := c.output(ctx, "container", "ls", "-q")
	var errs []error
	for _, id := range strings.Fields(out) {
		if _, err := c.output(ctx, "container", "rm", id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// lastLines returns the last n lines of s, for error messages.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
