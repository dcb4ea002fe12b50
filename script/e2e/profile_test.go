package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazylayer/lazylayer/fs/lazy"
)

// TestAccessProfile: the files a container opened on one daemon, saved
// with `lazylayer profile save`, are fetched by another daemon (a fresh
// state, as on another node) right after it mounts the image's layers; the
// same container then runs there without a request for its files.
func TestAccessProfile(t *testing.T) {
	reg, proxy := startRegistry(t)
	const held = "[lazy]\n  populate = \"manual\"\n"
	src := push(t, reg.Addr(), "e2e/profile:gzip", sampleImage("profile"))
	first := newEnv(t, reg.Addr(), proxy.Addr(), held)
	img := first.convert(src, "e2e/profile:estargz")
	const cmd = "cat /hello && ls /data >/dev/null"
	run := func(e *env, name string) string {
		return e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, name, "sh", "-c", cmd)
	}
	if out, err := first.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if out := run(first, "profile-record"); out != "hello from profile\n" {
		t.Fatalf("container printed %q", out)
	}
	dir := filepath.Join(t.TempDir(), "profiles")
	out, err := exec.Command(lazylayerBin, "profile", "save", "--address", first.lazySock, dir).CombinedOutput()
	if err != nil {
		t.Fatalf("lazylayer profile save: %v\n%s", err, out)
	}
	saved, _ := filepath.Glob(filepath.Join(dir, "sha256-*.json"))
	if len(saved) == 0 {
		t.Fatalf("lazylayer profile save wrote no profile:\n%s", out)
	}
	// A layer no file was opened from has no profile: a broken one in
	// its place is ignored, and its mount goes on.
	bogus := false
	for _, l := range img.layers {
		if p := filepath.Join(dir, lazy.ProfileName(l.Digest)); !fileExists(p) {
			writeFile(t, p, "not a profile")
			bogus = true
			break
		}
	}

	second := newEnv(t, reg.Addr(), proxy.Addr(), held, "  profile_dir = \""+dir+"\"\n")
	proxy.Reset()
	if out, err := second.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull on the second daemon: %v\n%s", err, out)
	}
	// Each profiled layer's files are fetched once: as soon as its TOC
	// was read ahead, or at its mount.
	waitFor(t, "the profiles replayed", func() bool {
		log := second.lazyLogText()
		if strings.Count(log, "access profile replayed") != strings.Count(log, "replaying the access profile") {
			return false
		}
		for _, p := range saved {
			encoded := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(p), "sha256-"), ".json")
			found := false
			for line := range strings.Lines(log) {
				found = found || strings.Contains(line, "access profile replayed") && strings.Contains(line, encoded)
			}
			if !found {
				return false
			}
		}
		return true
	})
	replayed := blobRequests(proxy)
	if replayed == 0 {
		t.Fatalf("the second daemon fetched nothing for its profiles")
	}
	t.Logf("%d profiles (a broken one besides: %v) replayed in %d blob requests", len(saved), bogus, replayed)
	proxy.Reset()
	if out := run(second, "profile-replay"); out != "hello from profile\n" {
		t.Fatalf("container on the second daemon printed %q", out)
	}
	if n := blobRequests(proxy); n != 0 {
		t.Errorf("the container made %d blob requests after the replay (%d requests), want 0", n, replayed)
	}
	if bogus && !strings.Contains(second.lazyLogText(), "access profile ignored") {
		t.Errorf("a broken profile was not reported in the log")
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
