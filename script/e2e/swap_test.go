package e2e

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// status asks the daemon's status endpoint for its layers.
func (e *env) status() []layerstatus.Layer {
	e.t.Helper()
	r, err := layerstatus.NewClient(layerstatus.Address(e.lazySock)).Layers(context.Background(), false)
	if err != nil {
		e.t.Fatalf("status: %v", err)
	}
	return r.Layers
}

// populate starts the population of every lazy layer the daemon holds,
// as an operator would (the daemon runs with lazy.populate = "manual"), and
// returns once they are local.
func (e *env) populate() {
	e.t.Helper()
	out, err := exec.Command(lazylayerBin, "populate", "--address", e.lazySock, "--all", "--wait").CombinedOutput()
	if err != nil {
		e.t.Fatalf("lazylayer populate --all --wait: %v\n%s", err, out)
	}
}

// waitLocal waits until every layer of img is local.
func (e *env) waitLocal(img pushed, timeout time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		states := map[string]string{}
		for _, s := range e.status() {
			states[s.Digest] = s.State
		}
		local := 0
		for _, l := range img.layers {
			if states[l.Digest.String()] == "local" {
				local++
			}
		}
		if local == len(img.layers) {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("after %v, %d of %d layers are local: %v", timeout, local, len(img.layers), states)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// rootfsLowers returns the lowerdirs of the overlay a running container's
// root filesystem is.
func rootfsLowers(t *testing.T, id string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 || !strings.HasSuffix(fields[4], "/"+id+"/rootfs") {
			continue
		}
		// lazylayer mounts native overlays a layer at a time, shown as
		// lowerdir+= and datadir+=; they come out as "a:b::d" would.
		var layers, data []string
		for _, opt := range strings.Split(line[strings.Index(line, " - ")+3:], ",") {
			if lower, ok := strings.CutPrefix(opt, "lowerdir="); ok {
				return strings.Split(lower, ":")
			}
			if lower, ok := strings.CutPrefix(opt, "lowerdir+="); ok {
				layers = append(layers, lower)
			}
			if d, ok := strings.CutPrefix(opt, "datadir+="); ok {
				data = append(data, "", d)
			}
		}
		if len(layers) > 0 {
			return append(layers, data...)
		}
	}
	t.Fatalf("no overlay root filesystem for container %s", id)
	return nil
}

func hasLazyLower(lowers []string) bool {
	for _, l := range lowers {
		if strings.HasSuffix(l, "/lazy") {
			return true
		}
	}
	return false
}

// cachedChunks counts the chunk files in the daemon's chunk cache.
func (e *env) cachedChunks() int {
	n := 0
	filepath.WalkDir(filepath.Join(e.lazyRoot, "cache", "sha256"), func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			n++
		}
		return nil
	})
	return n
}

const gib = 1 << 30

// TestSwap follows a lazy image to local: a container started lazily keeps
// reading without error while its layers turn local, reads the local data
// through FUSE passthrough, and its FUSE mounts retire when it stops; a
// container started after the swap has no FUSE lowerdir, sees the same
// tree as containerd's overlayfs, and survives the daemon being killed.
func TestSwap(t *testing.T) {
	reg, proxy := startRegistry(t)
	e := newEnv(t, reg.Addr(), proxy.Addr(), `[lazy]
  populate = "manual"
  swap_grace = "1s"
`)
	big := testimage.Layer{Compression: testimage.Gzip, Entries: []testimage.Entry{
		testimage.Dir("huge", 0o755),
		testimage.BigFile("huge/1g", 0o644, testimage.Sparse(gib, map[int64][]byte{0: []byte("start"), gib - 3: []byte("end")})),
	}}
	tricky := testimage.Tricky()
	tricky.Layers = append(tricky.Layers, big)
	src := push(t, reg.Addr(), "e2e/swap:gzip", tricky)
	img := e.convert(src, "e2e/swap:estargz")
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if out, err := e.pull("overlayfs", src.ref); err != nil {
		t.Fatalf("pull with overlayfs: %v\n%s", err, out)
	}

	// A container started lazily reads in a loop while its layers
	// populate; every error and every checksum goes to its log.
	e.ctr("run", "-d", "--snapshotter", "lazylayer", img.ref, "early", "sh", "-c", `
want=$(md5sum /data/big/random-100m | cut -d' ' -f1)
while :; do
	got=$(md5sum /data/big/random-100m | cut -d' ' -f1) || echo "ERROR md5sum"
	[ "$got" = "$want" ] || echo "ERROR checksum $got != $want"
	find / -xdev -type f ! -path '/data/big/*' ! -path '/huge/*' -exec cat {} + >/dev/null 2>/tmp/err || { echo "ERROR find"; cat /tmp/err; }
	echo round
done >/tmp/log 2>&1`)
	if !hasLazyLower(rootfsLowers(t, "early")) {
		t.Fatal("the container started before population has no FUSE lowerdir: was the image lazy?")
	}
	rounds := func() int { // /tmp/log may not exist yet
		return strings.Count(e.ctrOut("task", "exec", "--exec-id", fmt.Sprintf("log-%d", time.Now().UnixNano()), "early", "cat", "/tmp/log"), "round")
	}
	waitFor(t, "the reads to start", func() bool {
		_, err := e.ctrErr("task", "exec", "--exec-id", fmt.Sprintf("started-%d", time.Now().UnixNano()), "early", "test", "-e", "/tmp/log")
		return err == nil
	})
	e.populate()
	local := rounds()
	waitForWithin(t, "two rounds of reads after the swap", 5*time.Minute, func() bool { return rounds() >= local+2 })
	log := e.ctr("task", "exec", "--exec-id", "log", "early", "cat", "/tmp/log")
	if strings.Contains(log, "ERROR") || !strings.Contains(log, "round") {
		t.Errorf("the lazily started container saw errors across the swap:\n%s", log)
	}
	t.Logf("the lazily started container read the image %d times across the swap", strings.Count(log, "round"))

	// Reading the populated 1 GiB file in that container never reaches the
	// daemon's read handler when passthrough is available.
	readsBefore := totalReads(e.status())
	out := e.ctr("task", "exec", "--exec-id", "huge", "early", "sh", "-c", "wc -c < /huge/1g; tail -c 3 /huge/1g")
	if out != "1073741824\nend" {
		t.Errorf("reading /huge/1g after the swap: %q", out)
	}
	reads := totalReads(e.status()) - readsBefore
	if strings.Contains(e.lazyLogText(), "FUSE passthrough unavailable") {
		t.Logf("passthrough unavailable here: the daemon served %d reads", reads)
	} else if reads != 0 {
		t.Errorf("with passthrough, reading 1 GiB of a local layer reached the daemon's read handler %d times", reads)
	}

	// A container started after the swap has no FUSE mount in its overlay
	// and sees what containerd's overlayfs shows.
	e.ctr("run", "-d", "--snapshotter", "lazylayer", img.ref, "late", "sleep", "3600")
	if lowers := rootfsLowers(t, "late"); hasLazyLower(lowers) {
		t.Errorf("a container started after the swap has a FUSE lowerdir: %v", lowers)
	}
	compareTrees(t, e.mountView("lazylayer", "swap-lazy", img.chainID(t)), e.mountView("overlayfs", "swap-overlay", src.chainID(t)))

	// When the early container is gone, the FUSE mounts retire and no
	// chunk of the layers stays cached. (Its root filesystem, a native
	// overlay the snapshotter mounted, lives as long as its snapshot.)
	e.ctr("task", "kill", "-s", "KILL", "early")
	waitFor(t, "the early container to stop", func() bool {
		_, err := e.ctrErr("task", "delete", "early")
		return err == nil
	})
	e.ctr("container", "delete", "early")
	waitFor(t, "the FUSE mounts to retire", func() bool {
		for _, s := range e.status() {
			if s.Mountpoint != "" {
				return false
			}
		}
		return len(e.lazyMounts()) == 0
	})
	if n := e.cachedChunks(); n != 0 {
		t.Errorf("%d chunks of local layers remain in the cache", n)
	}
	if strings.Contains(e.lazyLogText(), "FUSE mount retired") == false {
		t.Error("the log does not say the FUSE mounts retired")
	}

	// Killing the daemon does not disturb the container started after the
	// swap; a new daemon serves new containers from the local layers with
	// the registry gone.
	e.lazy.stop(t, syscall.SIGKILL)
	if out := e.ctr("task", "exec", "--exec-id", "alive", "late", "tail", "-c", "3", "/huge/1g"); out != "end" {
		t.Errorf("after the daemon was killed the container read %q", out)
	}
	if err := proxy.Refuse(); err != nil {
		t.Fatal(err)
	}
	defer proxy.Accept()
	os.Remove(e.lazySock)
	e.startLazylayer()
	out = e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "after-restart", "sh", "-c", "tail -c 3 /huge/1g; md5sum /data/big/random-100m | cut -c1-8")
	if !strings.HasPrefix(out, "end") {
		t.Errorf("a container started from local layers with the registry gone printed %q", out)
	}
}

func totalReads(layers []layerstatus.Layer) int64 {
	var n int64
	for _, l := range layers {
		n += l.Reads
	}
	return n
}
