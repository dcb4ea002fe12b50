package e2e

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/script/internal/registry"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// sampleImage is busybox plus a zstd layer with an 8 MiB file and an
// uncompressed one, so every compression and several ranges are exercised.
func sampleImage(tag string) testimage.Image {
	return testimage.Busybox(
		testimage.Layer{Compression: testimage.Zstd, Entries: []testimage.Entry{
			testimage.Dir("data", 0o755),
			testimage.BigFile("data/big", 0o644, testimage.Random(7, 8<<20)),
		}},
		testimage.Layer{Compression: testimage.None, Entries: []testimage.Entry{
			testimage.File("hello", 0o644, "hello from "+tag+"\n"),
		}},
	)
}

func startRegistry(t *testing.T) (*registry.Registry, *registry.Proxy) {
	t.Helper()
	reg := registry.StartT(t)
	proxy, err := registry.NewProxy(reg.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	return reg, proxy
}

// TestPullAndRun: ctr pulls and runs a multi-layer image through lazylayer,
// which fetched every layer itself with ranged requests.
func TestPullAndRun(t *testing.T) {
	reg, proxy := startRegistry(t)
	e := newEnv(t, reg.Addr(), proxy.Addr())
	img := push(t, reg.Addr(), "e2e/sample:1", sampleImage("sample"))

	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "sample-run",
		"sh", "-c", "cat /hello; wc -c < /data/big; cat /srv/hello.txt")
	want := "hello from sample\n8388608\nhello from lazylayer\n"
	if !strings.HasSuffix(out, want) {
		t.Errorf("container printed %q, want %q", out, want)
	}
	if held := e.contentHas(img); len(held) > 0 {
		t.Errorf("containerd's content store holds layer blobs %v: containerd fetched them, not lazylayer", held)
	}
	if strings.Contains(e.lazyLogText(), "containerd will pull") {
		t.Errorf("lazylayer fell back to containerd's pull")
	}
	big := img.layers[2]
	ranges := proxy.Stats()["/v2/e2e/sample/blobs/"+big.Digest.String()].Ranges
	if len(ranges) < 8 {
		t.Errorf("the 8 MiB layer was fetched with %d ranged requests (%v), want at least 8 of 1 MiB", len(ranges), ranges)
	}
	// The registry's own access log shows the partial-content answers.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := reg.WaitAccessLog(ctx, func(entries []registry.AccessEntry) bool {
		n := 0
		for _, a := range entries {
			if a.Status == 206 && strings.Contains(a.URI, big.Digest.String()) {
				n++
			}
		}
		return n >= 8
	}); err != nil {
		t.Errorf("registry access log: fewer than 8 answers 206 for %s: %v", big.Digest, err)
	}
}

// TestFidelity: the root filesystem lazylayer gives for the tricky image is
// identical to the one containerd's overlayfs snapshotter gives.
func TestFidelity(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr())
	img := push(t, reg.Addr(), "e2e/tricky:1", testimage.Tricky())

	for _, sn := range []string{"lazylayer", "overlayfs"} {
		if out, err := e.pull(sn, img.ref); err != nil {
			t.Fatalf("pull with %s: %v\n%s", sn, err, out)
		}
	}
	if held := e.contentHas(img); len(held) != len(img.layers) {
		t.Logf("content store holds %d of %d layers (overlayfs pulls them)", len(held), len(img.layers))
	}
	chain := img.chainID(t)
	lazy := e.mountView("lazylayer", "fidelity-lazy", chain)
	overlay := e.mountView("overlayfs", "fidelity-overlay", chain)

	compareTrees(t, lazy, overlay)

	out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "tricky-run", "sh", "-c", "echo tricky ok")
	if !strings.Contains(out, "tricky ok") {
		t.Errorf("container from the tricky image printed %q", out)
	}
}

// TestRestart: stopping and starting the daemon leaves snapshots and running
// containers intact, and a new container needs no fetch. Population is held
// (manual policy): a background download would fetch blobs whenever it ran.
func TestRestart(t *testing.T) {
	reg, proxy := startRegistry(t)
	e := newEnv(t, reg.Addr(), proxy.Addr(), manualPopulation)
	img := push(t, reg.Addr(), "e2e/restart:1", sampleImage("restart"))
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	e.ctr("run", "-d", "--snapshotter", "lazylayer", img.ref, "long", "sleep", "3600")
	before := e.ctr("snapshots", "--snapshotter", "lazylayer", "ls")

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		e.restartLazylayer(sig)
		if after := e.ctr("snapshots", "--snapshotter", "lazylayer", "ls"); after != before {
			t.Errorf("after %v: snapshots changed:\nbefore:\n%s\nafter:\n%s", sig, before, after)
		}
		if out := e.ctr("task", "exec", "--exec-id", "probe-"+sig.String()[:4], "long", "cat", "/hello"); out != "hello from restart\n" {
			t.Errorf("after %v: the running container read %q", sig, out)
		}
	}

	blobGETs := func() int {
		n := 0
		for _, r := range proxy.Requests() {
			if r.Method == "GET" && strings.Contains(r.Path, "/blobs/") {
				n++
			}
		}
		return n
	}
	fetched := blobGETs()
	out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "second", "cat", "/hello")
	if out != "hello from restart\n" {
		t.Errorf("second container printed %q", out)
	}
	if n := blobGETs(); n != fetched {
		t.Errorf("the second container made lazylayer fetch %d blobs", n-fetched)
	}
}
