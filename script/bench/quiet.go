package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// The machine is shared with people compiling and testing. Before each
// run the bench samples how busy the CPUs are while its own processes are
// idle, waits a while for a quieter moment if they are busy, and records
// what it saw with the run, so noisy numbers can be told apart.
const busyThreshold = 0.25 // fraction of all CPU time

// cpuTimes returns the busy and total jiffies of all CPUs from /proc/stat.
func cpuTimes() (busy, total uint64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, fmt.Errorf("read /proc/stat: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("parse /proc/stat: %q", line)
	}
	for i, s := range f[1:] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("parse /proc/stat: %w", err)
		}
		// user nice system idle iowait irq softirq steal guest guest_nice;
		// guest time is already counted in user.
		if i >= 8 {
			break
		}
		total += v
		if i != 3 && i != 4 {
			busy += v
		}
	}
	return busy, total, nil
}

// busyFraction samples CPU use over d.
func busyFraction(ctx context.Context, d time.Duration) (float64, error) {
	b0, t0, err := cpuTimes()
	if err != nil {
		return 0, err
	}
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-time.After(d):
	}
	b1, t1, err := cpuTimes()
	if err != nil {
		return 0, err
	}
	if t1 == t0 {
		return 0, nil
	}
	return float64(b1-b0) / float64(t1-t0), nil
}

// waitQuiet returns the CPU busy fraction once it is below busyThreshold,
// or the last one seen after maxWait.
func waitQuiet(ctx context.Context, maxWait time.Duration) (float64, error) {
	deadline := time.Now().Add(maxWait)
	logged := false
	for {
		f, err := busyFraction(ctx, time.Second)
		if err != nil || f < busyThreshold {
			return f, err
		}
		if time.Now().After(deadline) {
			logf("machine still busy (%.0f%% CPU used by others); measuring anyway", f*100)
			return f, nil
		}
		if !logged {
			logf("machine busy (%.0f%% CPU used by others); waiting up to %v for a quieter moment", f*100, maxWait)
			logged = true
		}
	}
}
