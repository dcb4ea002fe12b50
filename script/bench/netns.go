package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// innerEnv names the network namespace the process runs in; it is set
// when the bench re-runs itself inside the namespace it created.
const innerEnv = "LAZYLAYER_BENCH_NETNS"

// nsPrefix starts the name of every network namespace the bench creates;
// the rest is the creating process's PID.
const nsPrefix = "lazylayer-bench-"

// runOuter prepares what needs the host's network (root filesystems from
// the Debian mirror), then creates a network namespace, runs the bench
// again inside it and deletes the namespace when that returns.
func runOuter(ctx context.Context, o options) error {
	unlock, err := lockBench(o.cache)
	if err != nil {
		return err
	}
	defer unlock()
	if err := prepareRootfs(ctx, o); err != nil {
		return err
	}
	removeStaleNamespaces()
	ns := nsPrefix + strconv.Itoa(os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %w: %s", ns, err, out)
	}
	defer func() {
		if out, err := exec.Command("ip", "netns", "delete", ns).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "lazylayer-bench: ip netns delete %s: %v: %s\n", ns, err, out)
		}
	}()
	return runInNamespace(ctx, ns, o.args)
}

// runInNamespace runs this program with args in network namespace ns and
// waits for it. Only the network namespace changes (nsenter --net, unlike
// ip netns exec, keeps the mount namespace), so mounts made inside are the
// host's. A signal to this process is passed on as SIGTERM, so the inner
// process cleans up before the namespace goes.
func runInNamespace(ctx context.Context, ns string, args []string) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, "--", self}, args...)...)
	cmd.Env = append(os.Environ(), innerEnv+"="+ns)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the bench in namespace %s: %w", ns, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		fmt.Fprintln(os.Stderr, "lazylayer-bench: interrupted; stopping and cleaning up")
		cmd.Process.Signal(syscall.SIGTERM)
		err = <-done
		if err == nil {
			err = ctx.Err()
		}
	}
	if err != nil {
		return fmt.Errorf("bench in namespace %s: %w", ns, err)
	}
	return nil
}

// removeStaleNamespaces deletes namespaces an earlier bench created and
// left behind because it was killed: those whose creator no longer runs.
func removeStaleNamespaces() {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		pid, ok := strings.CutPrefix(e.Name(), nsPrefix)
		if !ok {
			continue
		}
		n, err := strconv.Atoi(pid)
		if err != nil || !errors.Is(syscall.Kill(n, 0), syscall.ESRCH) {
			continue
		}
		if out, err := exec.Command("ip", "netns", "delete", e.Name()).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "lazylayer-bench: remove stale namespace %s: %v: %s\n", e.Name(), err, out)
		}
	}
}

// shaper shapes the namespace's loopback: traffic from one TCP port (the
// link proxy's, so only what the registry side sends to the clients) goes
// through an htb class with the profile's rate, chosen by a u32 filter. netem is not available on these kernels,
// so latency is the link proxy's job.
type shaper struct {
	port int
}

// bringUpLoopback sets the namespace's loopback up.
func bringUpLoopback(ctx context.Context) error {
	return runCmd(ctx, "ip", "link", "set", "lo", "up")
}

// apply replaces the loopback's root qdisc with one for rateMbit (0:
// unshaped). Traffic from other ports (requests, the registry's replies to
// the proxies) is not classified and passes unshaped. The htb class has a
// burst well above loopback's 64 KiB packets, and a byte FIFO as its queue
// holding 50 ms at the rate, the buffer of a modest router: the default
// FIFO of 1000 packets of up to 64 KiB would queue seconds of data before
// anything else. (fq_codel and sfq are not built into these kernels.)
func (s shaper) apply(ctx context.Context, rateMbit int) error {
	if err := s.clear(ctx); err != nil {
		return err
	}
	if rateMbit == 0 {
		return nil
	}
	rate := fmt.Sprintf("%dmbit", rateMbit)
	queue := max(rateMbit*1_000_000/8/20, 256<<10) // bytes in 50 ms
	for _, args := range [][]string{
		{"qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "r2q", "1000"},
		{"class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb",
			"rate", rate, "ceil", rate, "burst", "256k", "cburst", "256k"},
		{"qdisc", "add", "dev", "lo", "parent", "1:10", "handle", "10:", "bfifo", "limit", strconv.Itoa(queue)},
		{"filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
			"u32", "match", "ip", "sport", strconv.Itoa(s.port), "0xffff", "flowid", "1:10"},
	} {
		if err := runCmd(ctx, "tc", args...); err != nil {
			return fmt.Errorf("shape loopback to %s: %w", rate, err)
		}
	}
	return nil
}

// clear removes the root qdisc, if any.
func (s shaper) clear(ctx context.Context) error {
	out, err := exec.CommandContext(ctx, "tc", "qdisc", "del", "dev", "lo", "root").CombinedOutput()
	if err != nil && !strings.Contains(string(out), "Cannot delete qdisc with handle of zero") &&
		!strings.Contains(string(out), "No such file") {
		return fmt.Errorf("tc qdisc del dev lo root: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// runCmd runs a short command and returns its output in the error.
func runCmd(ctx context.Context, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
