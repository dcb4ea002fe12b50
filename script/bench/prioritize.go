package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// tagPrioritized is the converted image rebuilt with the files a first
// lazy run of the workload opened placed first (the prefetch landmark).
const tagPrioritized = "prioritized"

// ensurePrioritized makes registry/repo:tagPrioritized: it runs the
// workload once from the converted image through lazylayer (registry
// reached directly, no shaping), takes `lazylayer status --accessed` as the
// prefetch list and converts the gzip image again with --prioritize, which
// is how a user would do it. The list is kept in the cache.
func ensurePrioritized(ctx context.Context, o options, t tools, reg registryClient, hostsDir string, img benchImage, rec *pushedImage) error {
	if t.cli == "" {
		return fmt.Errorf("mode lazylayer-prioritized needs bin/lazylayer")
	}
	if got, err := reg.manifestDigest(ctx, img.repo(), tagPrioritized); err != nil {
		return err
	} else if got != "" && got == rec.Prioritized && rec.PrioritizedFrom == rec.Converted {
		return nil
	}
	start := time.Now()
	list, err := traceAccessed(ctx, o, t, reg, hostsDir, img)
	if err != nil {
		return fmt.Errorf("record the files %s opens: %w", img.name, err)
	}
	listPath := filepath.Join(o.cache, "images", img.name+".prefetch")
	if err := os.WriteFile(listPath, []byte(list), 0o644); err != nil {
		return err
	}
	src := reg.addr + "/" + img.repo() + ":" + tagGzip
	dst := reg.addr + "/" + img.repo() + ":" + tagPrioritized
	args := []string{"convert", "--hosts-dir", hostsDir, "--prioritize", listPath, src, dst}
	if out, err := exec.CommandContext(ctx, t.cli, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("lazylayer %s: %w: %s", strings.Join(args, " "), err, lastLines(string(out), 10))
	}
	dgst, err := reg.manifestDigest(ctx, img.repo(), tagPrioritized)
	if err != nil {
		return err
	}
	rec.Prioritized, rec.PrioritizedFrom = dgst, rec.Converted
	logf("image %s converted with a prefetch list of %d files in %s", img.name, strings.Count(list, "\n"), time.Since(start).Round(time.Second))
	return nil
}

// traceAccessed runs img's workload from its converted image and returns
// the files lazylayer saw opened, one per line.
func traceAccessed(ctx context.Context, o options, t tools, reg registryClient, hostsDir string, img benchImage) (string, error) {
	return traceRun(ctx, o, t, reg, hostsDir, img, func(sock string) (string, error) {
		out, err := exec.CommandContext(ctx, t.cli, "status", "--address", sock, "--accessed").Output()
		if err != nil {
			return "", fmt.Errorf("lazylayer status --accessed: %w", err)
		}
		return string(out), nil
	})
}

// traceConfig holds population in the trace run: a file whose data is
// local before the workload opens it is opened natively, never seen by
// lazylayer, and would be missing from what the run records.
const traceConfig = "[lazy]\n  populate = \"manual\"\n"

// traceRun runs img's workload from its converted image through a
// lazylayer of its own (state under the work directory, registry reached
// directly) and returns what after, given the daemon's socket, returns
// once the workload printed its first line.
func traceRun(ctx context.Context, o options, t tools, reg registryClient, hostsDir string, img benchImage, after func(sock string) (string, error)) (_ string, err error) {
	dir := filepath.Join(o.work, "trace-"+img.name)
	st, err := startStack(ctx, t, dir, filepath.Join(o.work, "logs", "trace-"+img.name), hostsDir, traceConfig, "")
	if err != nil {
		return "", err
	}
	defer func() {
		if cerr := st.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	ref := reg.addr + "/" + img.repo() + ":" + tagConverted
	if err := st.ctr.pull(ctx, "lazylayer", ref); err != nil {
		return "", err
	}
	ct, err := st.ctr.run(ctx, "lazylayer", ref, "lltrace-"+strconv.Itoa(os.Getpid()), "set -e\n"+img.coldCmd+"\nexec sleep 1000000")
	if err != nil {
		return "", err
	}
	defer st.ctr.kill(ct)
	first, err := ct.next(ctx, startTimeout)
	if err != nil {
		return "", err
	}
	if first.text != "hi" {
		return "", fmt.Errorf("first output line %q, want %q", first.text, "hi")
	}
	return after(st.lazySock)
}
