package main

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// benchImage is an image the bench pulls and runs.
type benchImage struct {
	name  string
	about string // for the report
	// rootfs are the cached root filesystems it is built from, bottom
	// first: the first is one layer, each next one a layer of what it
	// changed.
	rootfs []string
	// version changes whenever what build makes changes, so the cached,
	// pushed image is rebuilt.
	version string
	// coldCmd is the workload: a shell script whose first output line is
	// "hi", run by the container started right after the pull.
	coldCmd string
	// tree is the directory the steady-state measurement reads with tar.
	tree string
	// build returns the image; rootfs images are built from the cache.
	build func(cache string) (testimage.Image, error)
	// maxRuns, if set, caps the runs per profile and mode: a run of the
	// synthetic image moves 2 GiB, minutes at 100 Mbit/s.
	maxRuns int
	// skipModes are modes that would tell nothing the others do not.
	skipModes []string
}

// runs is how many runs of b the options ask for.
func (b benchImage) runs(o options) int {
	if b.maxRuns > 0 {
		return min(o.runs, b.maxRuns)
	}
	return o.runs
}

// modes are the options' modes that apply to b.
func (b benchImage) modes(o options) []string {
	var out []string
	for _, m := range o.modes {
		if !slices.Contains(b.skipModes, m) {
			out = append(out, m)
		}
	}
	return out
}

// repo is the image's repository in the registry.
func (b benchImage) repo() string { return "bench/" + b.name }

func images() []benchImage {
	return []benchImage{
		{
			name:    "python",
			about:   "Debian 12 minbase (debootstrap) + python3: 2 layers",
			rootfs:  []string{"minbase", "python"},
			version: "1",
			coldCmd: `python3 -c 'import json, http.server; print("hi")'`,
			tree:    "/usr",
		},
		{
			name:    "gcc",
			about:   "the python image + gcc and libc6-dev: 3 layers",
			rootfs:  []string{"minbase", "python", "gcc"},
			version: "1",
			coldCmd: `printf '#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n' >/tmp/hello.c && gcc -o /tmp/hello /tmp/hello.c && /tmp/hello`,
			tree:    "/usr",
		},
		{
			name:    "synthetic",
			about:   "busybox, one 2 GiB file of random bytes and 50,000 small text files: 3 layers",
			version: "1",
			coldCmd: "cat " + strings.Join(syntheticSamples(), " ") + " >/dev/null && echo hi",
			tree:    "/data/small",
			build:   func(string) (testimage.Image, error) { return synthetic(), nil },
			maxRuns: 3,
			// Its workload reads five small files: a prefetch list of
			// them would change nothing but cost a 2 GiB conversion.
			skipModes: []string{"lazylayer-prioritized"},
		},
		{
			name:    "large200",
			about:   "testimage.Large(200 MiB, 4 layers), every layer gzip, workload `echo hi`",
			version: "1",
			coldCmd: "echo hi",
			tree:    "/data",
			build:   func(string) (testimage.Image, error) { return large200(), nil },
		},
	}
}

func catalogueNames() []string {
	var names []string
	for _, i := range images() {
		names = append(names, i.name)
	}
	return names
}

// catalogue returns the image called name; names are checked when the
// options are parsed.
func catalogue(name string) benchImage {
	for _, i := range images() {
		if i.name == name {
			if len(i.rootfs) > 0 {
				rootfs := i.rootfs
				i.build = func(cache string) (testimage.Image, error) { return debianImage(cache, rootfs) }
			}
			return i
		}
	}
	panic("unknown image " + name)
}

// debianImage builds an image of gzip layers from cached root filesystems:
// the first whole, each next one as its difference from the one before.
func debianImage(cache string, rootfs []string) (testimage.Image, error) {
	img := testimage.Image{Config: ocispec.ImageConfig{
		Cmd: []string{"/bin/bash"},
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"},
	}}
	prev := ""
	for _, name := range rootfs {
		dir := rootfsDir(cache, name)
		l, err := testimage.FromDirDiff(prev, dir, testimage.Gzip)
		if err != nil {
			return img, fmt.Errorf("layer of root filesystem %s: %w", name, err)
		}
		img.Layers = append(img.Layers, l)
		prev = dir
	}
	return img, nil
}

const (
	syntheticSmallDirs    = 500
	syntheticFilesPerDir  = 100
	syntheticBigFileBytes = 2 << 30
)

// syntheticSamples are the five small files the synthetic workload reads.
func syntheticSamples() []string {
	var out []string
	for _, n := range []int{0, 9_999, 24_321, 37_777, 49_999} {
		out = append(out, "/"+syntheticSmallName(n))
	}
	return out
}

func syntheticSmallName(n int) string {
	return fmt.Sprintf("data/small/d%03d/f%05d", n/syntheticFilesPerDir, n)
}

// synthetic is busybox, then a layer with one 2 GiB file of random bytes,
// then a layer of 50,000 text files of 512 B to 8 KiB in 500 directories.
func synthetic() testimage.Image {
	base := testimage.Busybox()
	big := testimage.Layer{Compression: testimage.Gzip, Entries: []testimage.Entry{
		testimage.Dir("data", 0o755),
		testimage.Dir("data/big", 0o755),
		testimage.BigFile("data/big/blob", 0o644, testimage.Random(2024, syntheticBigFileBytes)),
	}}
	rng := rand.New(rand.NewPCG(50_000, 0x736d616c6c))
	small := testimage.Layer{Compression: testimage.Gzip, Entries: []testimage.Entry{
		testimage.Dir("data", 0o755),
		testimage.Dir("data/small", 0o755),
	}}
	for n := range syntheticSmallDirs * syntheticFilesPerDir {
		if n%syntheticFilesPerDir == 0 {
			small.Entries = append(small.Entries, testimage.Dir(filepath.Dir(syntheticSmallName(n)), 0o755))
		}
		size := 512 + rng.Int64N(7<<10+512)
		small.Entries = append(small.Entries, testimage.BigFile(syntheticSmallName(n), 0o644, testimage.Text(uint64(n), size)))
	}
	return testimage.Image{Layers: []testimage.Layer{base.Layers[0], big, small}, Config: base.Config}
}

// large200 is the image of the first full-fetch measurement: mkimage's
// large kind (200 MiB in 4 layers over a busybox base) with every layer
// gzip-compressed, as most registries' images are.
func large200() testimage.Image {
	img := testimage.Large(200, 4)
	for i := range img.Layers {
		img.Layers[i].Compression = testimage.Gzip
	}
	return img
}

// largestFile returns the path and size of the biggest regular file in
// img's merged tree.
func largestFile(img testimage.Image) (string, int64, error) {
	sizes := map[string]int64{}
	for _, l := range img.Layers {
		for _, e := range l.Entries {
			name := strings.TrimSuffix(e.Name, "/")
			dir, base := filepath.Split(name)
			switch {
			case base == ".wh..wh..opq":
				deleteUnder(sizes, strings.TrimSuffix(dir, "/"))
			case strings.HasPrefix(base, ".wh."):
				target := dir + strings.TrimPrefix(base, ".wh.")
				delete(sizes, target)
				deleteUnder(sizes, target)
			case e.Type == testimage.TypeReg:
				size := int64(len(e.Content))
				if e.Body != nil {
					r, n, err := e.Body.Open()
					if err != nil {
						return "", 0, fmt.Errorf("size of %s: %w", e.Name, err)
					}
					r.Close()
					size = n
				}
				sizes[name] = size
			case e.Type == testimage.TypeHardlink:
				sizes[name] = sizes[e.Linkname]
			default:
				delete(sizes, name)
			}
		}
	}
	best, bestSize := "", int64(-1)
	for p, s := range sizes {
		if s > bestSize || (s == bestSize && p < best) {
			best, bestSize = p, s
		}
	}
	if best == "" {
		return "", 0, fmt.Errorf("image has no regular file")
	}
	return "/" + best, bestSize, nil
}

// deleteUnder removes the paths below dir from sizes.
func deleteUnder(sizes map[string]int64, dir string) {
	for p := range sizes {
		if strings.HasPrefix(p, dir+"/") {
			delete(sizes, p)
		}
	}
}
