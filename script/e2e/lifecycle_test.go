package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
)

// TestSecondDaemonRefused: a second daemon started on the socket of a
// running one, with another root, refuses to start and names the process
// that holds the socket; the first one keeps serving. A daemon with a fresh
// root answers status with an empty list.
func TestSecondDaemonRefused(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr())

	out, err := exec.Command(lazylayerBin, "status", "--address", e.lazySock, "--json").CombinedOutput()
	if err != nil {
		t.Fatalf("lazylayer status on a fresh root: %v\n%s", err, out)
	}
	var r layerstatus.Report
	if err := json.Unmarshal(out, &r); err != nil || len(r.Layers) != 0 {
		t.Errorf("lazylayer status on a fresh root: %v, %d layers\n%s", err, len(r.Layers), out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	second := exec.CommandContext(ctx, snapshotterBin, "--root", filepath.Join(e.dir, "second-root"),
		"--address", e.lazySock, "--config", filepath.Join(e.dir, "lazylayer.toml"))
	var stderr bytes.Buffer
	second.Stderr = &stderr
	err = second.Run()
	if err == nil {
		t.Fatal("a second daemon on the same socket started")
	}
	msg := stderr.String()
	if want := fmt.Sprintf("pid %d", e.lazy.cmd.Process.Pid); !strings.Contains(msg, "in use by") || !strings.Contains(msg, want) {
		t.Errorf("the second daemon said %q; want it to name %s", msg, want)
	}
	if _, err := os.Stat(e.lazySock); err != nil {
		t.Errorf("the first daemon's socket: %v", err)
	}
	e.status() // fails the test if the first daemon cannot be reached
	if out, err := e.pull("lazylayer", push(t, reg.Addr(), "e2e/second:gzip", sampleImage("second")).ref); err != nil {
		t.Errorf("pull through the first daemon after the second one tried: %v\n%s", err, out)
	}
}

// TestRestartLazyDisabled: a lazy layer that cannot be mounted again after a
// restart (lazy serving turned off) is fetched in full; a container started
// then sees the whole layer, never an empty directory in its place.
func TestRestartLazyDisabled(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), "[lazy]\n  populate = \"manual\"\n")
	img := e.convert(push(t, reg.Addr(), "e2e/relazyoff:gzip", sampleImage("relazyoff")), "e2e/relazyoff:estargz")
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if n := len(e.lazyMounts()); n != len(img.layers) {
		t.Fatalf("%d lazy mounts for %d layers", n, len(img.layers))
	}
	want := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "before", "sh", "-c", "cat /hello; md5sum /data/big")

	writeFile(t, e.dir+"/lazylayer.toml", "[fetch]\n  range_size = \"1MiB\"\n[lazy]\n  enabled = false\n")
	e.restartLazylayer(syscall.SIGTERM)
	if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "after", "sh", "-c", "cat /hello; md5sum /data/big"); out != want {
		t.Errorf("after a restart without lazy serving the container printed %q, before %q", out, want)
	}
	for _, s := range e.status() {
		if s.State != "local" {
			t.Errorf("layer %s is %s after it was fetched again", s.Digest, s.State)
		}
	}
	if n := len(e.lazyMounts()); n != 0 {
		t.Errorf("%d lazy mounts with lazy serving off", n)
	}
	if !strings.Contains(e.lazyLogText(), "cannot serve a lazy layer again") {
		t.Error("the log does not say why the layers were fetched again")
	}
}

// TestKilledDuringSwapGrace: a daemon killed after its layers turned local
// but before their FUSE mounts retired leaves their FUSE connections with
// the descriptor holder; the next daemon serves them again, the running
// container that uses them reads on, and it retires (detaches) them.
// (Before connections were handed over, the next daemon detached dead
// mounts and logged that a running container still used them.)
func TestKilledDuringSwapGrace(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), "[lazy]\n  populate = \"manual\"\n  swap_grace = \"1h\"\n")
	e.killHolderOnCleanup()
	img := e.convert(push(t, reg.Addr(), "e2e/grace:gzip", sampleImage("grace")), "e2e/grace:estargz")
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	e.ctr("run", "-d", "--snapshotter", "lazylayer", img.ref, "early", "sleep", "3600")
	if !hasLazyLower(rootfsLowers(t, "early")) {
		t.Fatal("the container has no FUSE lowerdir: was the image lazy?")
	}
	e.populate()
	e.lazy.stop(t, syscall.SIGKILL)
	if n := len(e.lazyMounts()); n != len(img.layers) {
		t.Fatalf("after the kill %d FUSE mounts are left, want %d", n, len(img.layers))
	}
	os.Remove(e.lazySock)
	e.startLazylayer()
	waitFor(t, "the FUSE mounts to be retired", func() bool { return len(e.lazyMounts()) == 0 })
	if n := e.resumedMounts(); n != len(img.layers) {
		t.Errorf("the next daemon serves %d FUSE connections the killed one left, want %d", n, len(img.layers))
	}
	if strings.Contains(e.lazyLogText(), "detached a dead FUSE mount") {
		t.Error("the next daemon detached a dead FUSE mount")
	}
	if out := e.ctr("task", "exec", "--exec-id", "probe", "early", "sh", "-c", "cat /hello; wc -c < /data/big"); out != "hello from grace\n8388608\n" {
		t.Errorf("the running container read %q", out)
	}
	for _, s := range e.status() {
		if s.State != "local" {
			t.Errorf("layer %s: state %s", s.Digest, s.State)
		}
	}
	if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "late", "cat", "/hello"); out != "hello from grace\n" {
		t.Errorf("a new container printed %q", out)
	}
}
