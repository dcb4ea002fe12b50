package e2e

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/script/internal/registry"
	"github.com/lazylayer/lazylayer/script/internal/rootfs"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// TestMeasureMount measures, for the python and gcc images converted by
// this tree's lazylayer convert and pulled by its daemon with population
// held: the bytes and ranged requests the daemon made for the layer blobs
// before the mounts (footers, TOCs, and exact records where there are
// some), the daemon's time per lazy mount, and the pull's wall time. Run
// with LAZYLAYER_MEASURE=<runs>; it logs the figures and checks nothing
// else than that every layer was mounted lazily.
func TestMeasureMount(t *testing.T) {
	runs, _ := strconv.Atoi(os.Getenv("LAZYLAYER_MEASURE"))
	if runs <= 0 {
		t.Skip("set LAZYLAYER_MEASURE=<runs> to measure")
	}
	reg, proxy := startRegistry(t)
	mirror, err := rootfs.Mirror()
	if err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(filepath.Dir(toolsBin), "bench-cache")
	for _, name := range []string{"python", "gcc"} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		_, err := rootfs.Ensure(ctx, cache, name, mirror)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		img := testimage.Image{}
		prev := ""
		for _, dir := range []string{"minbase", "python", "gcc"} {
			var l testimage.Layer
			if prev == "" {
				l, err = testimage.FromDir(rootfs.Dir(cache, dir), testimage.Gzip)
			} else {
				l, err = testimage.FromDirDiff(rootfs.Dir(cache, prev), rootfs.Dir(cache, dir), testimage.Gzip)
			}
			if err != nil {
				t.Fatal(err)
			}
			img.Layers = append(img.Layers, l)
			prev = dir
			if dir == name {
				break
			}
		}
		img.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
		src := push(t, reg.Addr(), "measure/"+name+":gzip", img)
		conv := newEnv(t, reg.Addr(), reg.Addr()).convert(src, "measure/"+name+":estargz")
		for run := 1; run <= runs; run++ {
			t.Run(name+"-"+strconv.Itoa(run), func(t *testing.T) { measureOnce(t, reg.Addr(), proxy, name, run, conv) })
		}
	}
}

var mountedRE = regexp.MustCompile(`msg="layer mounted lazily".*elapsed=([0-9.]+m?s)`)

func measureOnce(t *testing.T, regAddr string, proxy *registry.Proxy, name string, run int, conv pushed) {
	e := newEnv(t, regAddr, proxy.Addr(), manualPopulation)
	proxy.Reset()
	start := time.Now()
	if out, err := e.pull("lazylayer", conv.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	wall := time.Since(start)
	if n := len(e.lazyMounts()); n != len(conv.layers) {
		t.Fatalf("%d lazy mounts for %d layers", n, len(conv.layers))
	}
	served, _ := blobBytes(proxy.Stats(), conv)
	requests := 0
	for path, s := range proxy.Stats() {
		if strings.Contains(path, "/blobs/sha256:") {
			for _, l := range conv.layers {
				if strings.HasSuffix(path, l.Digest.String()) {
					requests += s.Requests
				}
			}
		}
	}
	var mounts []string
	var total time.Duration
	for _, m := range mountedRE.FindAllStringSubmatch(e.lazyLogText(), -1) {
		d, _ := time.ParseDuration(m[1])
		total += d
		mounts = append(mounts, m[1])
	}
	t.Logf("MEASURE %s run %d: %d layers, blob requests before mount %d, bytes %d, mount times %v (sum %v), pull wall %v",
		name, run, len(conv.layers), requests, served, mounts, total, wall.Round(time.Millisecond))
}
