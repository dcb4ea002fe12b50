package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// profilesDir is where the access profiles of img, recorded by a first
// lazy run of its workload, are kept in the cache: one file per layer, as
// `lazylayer profile save` writes them and lazy.profile_dir reads them.
func profilesDir(o options, img benchImage) string {
	return filepath.Join(o.cache, "images", img.name+".profiles")
}

// profilesStamp, in a profiles directory, names the converted image the
// profiles were recorded from, and how (traceStamp).
const profilesStamp = "converted"

// traceStamp names the way the trace run records: profiles recorded
// otherwise are recorded again. "held": population held (traceConfig);
// profiles recorded while population ran missed files made local first.
const traceStamp = "held"

// ensureProfiles records the access profiles of img's converted image
// for the lazylayer-profiled mode, unless the cache holds them for the
// image as converted now: it runs the workload once through a lazylayer
// of its own, as traceAccessed does for the prioritized image, and saves
// what that daemon saw opened with `lazylayer profile save`, which is how
// an operator would carry profiles to other nodes. The measured runs then
// start from a fresh daemon and the plain converted image.
func ensureProfiles(ctx context.Context, o options, t tools, reg registryClient, hostsDir string, img benchImage, rec pushedImage) error {
	if t.cli == "" {
		return fmt.Errorf("mode lazylayer-profiled needs bin/lazylayer")
	}
	dir := profilesDir(o, img)
	stamp := rec.Converted + " " + traceStamp
	if b, err := os.ReadFile(filepath.Join(dir, profilesStamp)); err == nil && strings.TrimSpace(string(b)) == stamp {
		return nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	start := time.Now()
	out, err := traceRun(ctx, o, t, reg, hostsDir, img, func(sock string) (string, error) {
		out, err := exec.CommandContext(ctx, t.cli, "profile", "save", "--address", sock, dir).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("lazylayer profile save: %w: %s", err, lastLines(string(out), 10))
		}
		return string(out), nil
	})
	if err != nil {
		return fmt.Errorf("record the access profiles of %s: %w", img.name, err)
	}
	if err := os.WriteFile(filepath.Join(dir, profilesStamp), []byte(stamp+"\n"), 0o644); err != nil {
		return err
	}
	logf("image %s: access profiles recorded in %s: %s", img.name, time.Since(start).Round(time.Second), strings.Join(strings.Fields(out), " "))
	return nil
}

// profiledConfig is lazylayer's configuration in the profiled mode.
func profiledConfig(o options, img benchImage) string {
	return fmt.Sprintf("[lazy]\n  profile_dir = %q\n", profilesDir(o, img))
}
