package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// newResults starts the results of this invocation with what describes
// it: machine, software, images, modes.
func newResults(ctx context.Context, o options, t tools, b *bench, conv converter) *results {
	r := &results{Meta: meta{
		Date:      time.Now().UTC(),
		Command:   benchCommand(o),
		Quick:     o.quick,
		Runs:      o.runs,
		Cores:     runtime.NumCPU(),
		CPU:       cpuModel(),
		MemoryGB:  memTotalGB(),
		Kernel:    kernelRelease(),
		OS:        osPrettyName(),
		LoadStart: loadAvg(),
		Versions: map[string]string{
			"lazylayer":                    firstLine(cmdOutput(ctx, "git", "-C", o.top, "describe", "--always", "--dirty")),
			"containerd":                   firstLine(cmdOutput(ctx, t.containerd, "--version")),
			"runc":                         firstLine(cmdOutput(ctx, "runc", "--version")),
			"docker-registry":              firstLine(cmdOutput(ctx, "docker-registry", "--version")),
			"go (bench)":                   runtime.Version(),
			"lazylayer-snapshotter binary": "sha256 " + fileDigest(t.snapshotter),
		},
		Fetch:       "lazylayer-snapshotter defaults (docs/configuration.md): 4 MiB ranges, 4 in flight per layer, 3 layers ahead",
		LocalSignal: b.status.describe() + peerLocalSignal(o.modes),
	}}
	r.Meta.Host, _ = os.Hostname()
	if conv.cli == "" {
		r.Meta.Notes = append(r.Meta.Notes, "bin/lazylayer (the `lazylayer convert` CLI) was not built when this ran: "+
			"the images tagged as converted are the gzip images pushed again, so lazylayer-estargz measures lazylayer's full-fetch path like lazylayer does.")
	}
	for _, name := range o.images {
		img, rec := catalogue(name), b.images[name]
		r.Images = append(r.Images, imageInfo{Name: name, About: img.about, Layers: rec.Layers, Size: rec.Size,
			ConvertedSize: rec.ConvertedSize, ConvertedBy: rec.ConvertedBy, BigFile: rec.BigFile, BigSize: rec.BigSize,
			Tree: img.tree, ColdCmd: img.coldCmd})
	}
	for _, name := range o.modes {
		m := findMode(name)
		r.Modes = append(r.Modes, modeInfo{Name: m.name, Snapshotter: m.snapshotter, Tag: m.tag, About: m.about, Held: m.held})
	}
	return r
}

// benchCommand is how the bench was invoked, as a user would type it.
func benchCommand(o options) string {
	var args []string
	for i := 0; i < len(o.args); i++ {
		switch a := o.args[i]; {
		case a == "-top" || a == "--top":
			i++
		case strings.HasPrefix(a, "-top=") || strings.HasPrefix(a, "--top="):
		default:
			args = append(args, a)
		}
	}
	if len(args) == 0 {
		return "make bench"
	}
	if len(args) == 1 && (args[0] == "-quick" || args[0] == "--quick") {
		return "make bench-quick"
	}
	return "bash script/bench.sh " + strings.Join(args, " ")
}

func cmdOutput(ctx context.Context, name string, args ...string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// fileDigest returns the start of the sha256 of the file at p.
func fileDigest(p string) string {
	f, err := os.Open(p)
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "unknown"
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func memTotalGB() float64 {
	b, _ := os.ReadFile("/proc/meminfo")
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb * 1024 / 1e9
		}
	}
	return 0
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func osPrettyName() string {
	b, _ := os.ReadFile("/etc/os-release")
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return "unknown"
}

// printSummary writes the medians of every image, profile and mode.
func printSummary(w io.Writer, r *results) {
	fmt.Fprintf(w, "\n%-10s %-14s %-18s %4s %22s %22s %14s %14s\n", "image", "profile", "mode", "runs",
		"cold start s (min-max)", "fully local s (min-max)", "snapshotter MB", "containerd MB")
	for _, p := range r.Profiles {
		for _, img := range r.Images {
			for _, m := range r.Modes {
				ss := r.selectSamples(img.Name, p.Name, m.Name)
				if len(ss) == 0 {
					continue
				}
				cold := field(ss, func(s sample) float64 { return s.ColdStart })
				local := field(ss, func(s sample) float64 { return s.Local })
				lz := field(ss, func(s sample) float64 { return mb(s.Daemons[snapshotterDaemon(m.Snapshotter)].PeakRSS) })
				cd := field(ss, func(s sample) float64 { return mb(s.Daemons["containerd"].PeakRSS) })
				fmt.Fprintf(w, "%-10s %-14s %-18s %4d %22s %22s %14.0f %14.0f\n", img.Name, p.Name, m.Name, len(ss),
					fmt.Sprintf("%.2f (%.2f-%.2f)", cold.Median, cold.Min, cold.Max),
					fmt.Sprintf("%.2f (%.2f-%.2f)", local.Median, local.Min, local.Max), lz.Median, cd.Median)
			}
		}
	}
	if f := r.failures(); len(f) > 0 {
		fmt.Fprintf(w, "%d runs failed; see results.json\n", len(f))
	}
}
