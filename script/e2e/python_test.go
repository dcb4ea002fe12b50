package e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/script/internal/registry"
	"github.com/lazylayer/lazylayer/script/internal/rootfs"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// pythonImage builds (once, cached under the tools folder) a Debian 12
// minbase root filesystem and the same with python3, and pushes them as a
// two-layer gzip image.
func pythonImage(t *testing.T, regAddr string) pushed {
	t.Helper()
	return push(t, regAddr, "e2e/python:gzip", pythonTestImage(t))
}

// pythonTestImage builds (once, cached under the tools folder) the
// Debian+python3 image of pythonImage.
func pythonTestImage(t *testing.T) testimage.Image {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	mirror, err := rootfs.Mirror()
	if err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(filepath.Dir(toolsBin), "bench-cache")
	if _, err := rootfs.Ensure(ctx, cache, "python", mirror); err != nil {
		t.Fatalf("build the Debian+python3 root filesystem: %v", err)
	}
	base, err := testimage.FromDir(rootfs.Dir(cache, "minbase"), testimage.Gzip)
	if err != nil {
		t.Fatal(err)
	}
	python, err := testimage.FromDirDiff(rootfs.Dir(cache, "minbase"), rootfs.Dir(cache, "python"), testimage.Gzip)
	if err != nil {
		t.Fatal(err)
	}
	img := testimage.Image{Layers: []testimage.Layer{base, python}}
	img.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	return img
}

// TestPython: a Debian+python3 image converted with lazylayer convert runs
// python through lazylayer having fetched less than 30% of its layer bytes.
func TestPython(t *testing.T) {
	reg, proxy := startRegistry(t)
	// Population off: what the registry serves is what python read.
	e := newEnv(t, reg.Addr(), proxy.Addr(), "[lazy]\n  populate = \"manual\"\n")
	src := pythonImage(t, reg.Addr())
	img := e.convert(src, "e2e/python:estargz")
	script := []string{"python3", "-c", `import json, http.server; print("hi")`}

	proxy.Reset()
	start := time.Now()
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	out := e.ctr(append([]string{"run", "--rm", "--snapshotter", "lazylayer", img.ref, "py-lazy"}, script...)...)
	lazyTime := time.Since(start)
	if out != "hi\n" {
		t.Fatalf("python printed %q", out)
	}
	served, total := blobBytes(proxy.Stats(), img)
	requests := blobRequests(proxy)
	t.Logf("lazylayer: pull+run %v; the registry served %d of %d layer bytes (%.1f%%) in %d blob requests",
		lazyTime.Round(time.Millisecond), served, total, 100*float64(served)/float64(total), requests)
	if served*10 >= total*3 {
		t.Errorf("the registry served %d of %d layer bytes, want less than 30%%", served, total)
	}

	start = time.Now()
	if out, err := e.pull("overlayfs", src.ref); err != nil {
		t.Fatalf("pull with overlayfs: %v\n%s", err, out)
	}
	out = e.ctr(append([]string{"run", "--rm", "--snapshotter", "overlayfs", src.ref, "py-overlay"}, script...)...)
	if out != "hi\n" {
		t.Fatalf("python under overlayfs printed %q", out)
	}
	t.Logf("overlayfs: pull+run %v (unshaped loopback; make bench measures properly)", time.Since(start).Round(time.Millisecond))
}

// blobRequests counts the blob requests the proxy saw.
func blobRequests(proxy *registry.Proxy) int {
	n := 0
	for path, s := range proxy.Stats() {
		if strings.Contains(path, "/blobs/") {
			n += s.Requests
		}
	}
	return n
}

// TestPrioritize: the files a first lazy run opened, listed by `lazylayer
// status --accessed` and given to `lazylayer convert --prioritize`, arrive
// in a few requests at mount, so the next cold start makes far fewer.
func TestPrioritize(t *testing.T) {
	reg, proxy := startRegistry(t)
	src := pythonImage(t, reg.Addr())
	script := []string{"python3", "-c", `import json, http.server; print("hi")`}
	run := func(e *env, img pushed, id string) int {
		t.Helper()
		proxy.Reset()
		if out, err := e.pull("lazylayer", img.ref); err != nil {
			t.Fatalf("pull: %v\n%s", err, out)
		}
		if out := e.ctr(append([]string{"run", "--rm", "--snapshotter", "lazylayer", img.ref, id}, script...)...); out != "hi\n" {
			t.Fatalf("python printed %q", out)
		}
		return blobRequests(proxy)
	}

	first := newEnv(t, reg.Addr(), proxy.Addr(), "[lazy]\n  populate = \"manual\"\n")
	plain := first.convert(src, "e2e/python:plain")
	before := run(first, plain, "py-first")
	list, err := exec.Command(lazylayerBin, "status", "--address", first.lazySock, "--accessed").Output()
	if err != nil {
		t.Fatalf("lazylayer status --accessed: %v", err)
	}
	if !strings.Contains(string(list), "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc") {
		t.Fatalf("the accessed list lacks the json module:\n%.3000s", list)
	}
	listFile := filepath.Join(first.dir, "prioritize.txt")
	writeFile(t, listFile, string(list))

	second := newEnv(t, reg.Addr(), proxy.Addr(), "[lazy]\n  populate = \"manual\"\n")
	prio := second.convert(src, "e2e/python:prioritized", "--prioritize", listFile)
	after := run(second, prio, "py-second")
	t.Logf("%d files listed; blob requests until python exited: %d without the list, %d with it",
		strings.Count(string(list), "\n"), before, after)
	if after*2 > before {
		t.Errorf("with the prefetch list python still needed %d requests (%d without)", after, before)
	}
}
