package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/remote"
)

// estargzNames are the entries estargz adds at a layer's root: the TOC (a
// tar entry in eStargz only) and the prefetch landmarks.
var estargzNames = []string{estargz.TOCTarName, estargz.PrefetchLandmark, estargz.NoPrefetchLandmark}

// prioritized are the paths the tests place first: in the busybox and tricky
// layers, written the ways users may, and one that no layer has.
var prioritized = []string{
	"bin/busybox", "/etc/os-release", "./srv/hello.txt", "data/hl/two",
	"data/opaque/new.txt", "data/big/random-100m", "not/there",
}

// runCLI runs lazylayer with args in-process and returns its stdout and
// stderr. The machine's docker credentials are kept out.
func runCLI(ctx context.Context, t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	c := &cli{stdout: &stdout, stderr: &stderr}
	err := c.run(ctx, args)
	return stdout.String(), stderr.String(), err
}

// testResolver returns a resolver with no hosts.toml and no credentials.
func testResolver(t *testing.T) *remote.Resolver {
	return remote.NewResolver(remote.Options{HostsDir: t.TempDir(), DockerConfig: t.TempDir()})
}

func writePrioritized(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "prioritize.txt")
	if err := os.WriteFile(p, []byte(strings.Join(prioritized, "\n")+"\n\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestConvert converts the busybox and tricky sample images to eStargz and
// zstd:chunked, and checks each layer blob, its TOC and annotations, the
// config, and that the layers apply to the same tree as the original's.
func TestConvert(t *testing.T) {
	addr := startRegistry(t)
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	pushSample(t, addr, "busybox:v1", "busybox")
	pushSample(t, addr, "tricky:v1", "tricky")
	prio := writePrioritized(t)
	for _, tc := range []struct {
		image string
		zstd  bool
		args  []string // more flags
		prio  bool     // --prioritize given
		chunk int      // --chunk-size given
	}{
		{image: "busybox", prio: true},
		{image: "busybox", zstd: true, prio: true},
		{image: "busybox", args: []string{"--chunk-size", "64KiB"}, chunk: 64 << 10},
		{image: "tricky", prio: true},
		{image: "tricky", zstd: true, prio: true},
	} {
		format := "estargz"
		args := []string{"convert", "--hosts-dir", t.TempDir()}
		if tc.zstd {
			format = "zstdchunked"
			args = append(args, "--zstdchunked")
		}
		if tc.prio {
			args = append(args, "--prioritize", prio)
		}
		args = append(args, tc.args...)
		name := tc.image + "/" + format
		if tc.chunk != 0 {
			name += "/chunk-size"
		}
		t.Run(name, func(t *testing.T) {
			ctx := t.Context()
			src := addr + "/" + tc.image + ":v1"
			dst := fmt.Sprintf("%s/converted/%s:%s-%d", addr, tc.image, format, tc.chunk)
			stdout, stderr, err := runCLI(ctx, t, append(args, src, dst)...)
			if err != nil {
				t.Fatalf("convert: %v\nstderr:\n%s", err, stderr)
			}
			t.Logf("stderr:\n%s", stderr)
			m := regexp.MustCompile(`^` + regexp.QuoteMeta(dst) + `@(sha256:[0-9a-f]{64})\n$`).FindStringSubmatch(stdout)
			if m == nil {
				t.Fatalf("stdout %q, want %s@<digest>", stdout, dst)
			}
			if tc.prio && !strings.Contains(stderr, "warning: no layer has these prioritized paths") {
				t.Errorf("stderr does not warn about missing prioritized paths")
			}
			got := checkImage(ctx, t, src, dst, digest.Digest(m[1]), tc.zstd, tc.prio, tc.chunk)
			if lines := strings.Count(stderr, "\nlayer ") + btoi(strings.HasPrefix(stderr, "layer ")); lines != got {
				t.Errorf("stderr has %d layer lines, want %d", lines, got)
			}
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// checkImage checks the image dst (pushed as dgst) against src and returns
// its number of layers.
func checkImage(ctx context.Context, t *testing.T, src, dst string, dgst digest.Digest, zstd, prio bool, chunk int) int {
	t.Helper()
	r := testResolver(t)
	desc, err := r.Resolve(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != dgst || desc.MediaType != ocispec.MediaTypeImageManifest {
		t.Fatalf("%s resolves to %+v, want manifest %s", dst, desc, dgst)
	}
	srcDesc, err := r.Resolve(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	srcM, err := r.Manifest(ctx, src, srcDesc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	dstM, err := r.Manifest(ctx, dst, dgst)
	if err != nil {
		t.Fatal(err)
	}
	if len(dstM.Layers) != len(srcM.Layers) {
		t.Fatalf("%d layers, want %d", len(dstM.Layers), len(srcM.Layers))
	}
	if dstM.Config.MediaType != ocispec.MediaTypeImageConfig {
		t.Errorf("config media type %q", dstM.Config.MediaType)
	}
	diffIDs := checkConfig(ctx, t, r, src, srcM.Config, dst, dstM.Config)
	root := os.Geteuid() == 0
	if !root {
		t.Log("not root: trees not compared (chown, mknod, trusted.* xattrs)")
	}
	for i, l := range dstM.Layers {
		blob := readBlob(ctx, t, r, dst, l)
		checkLayer(t, l, blob, zstd, prio, chunk)
		var orig, conv string
		if root {
			orig, conv = t.TempDir(), t.TempDir()
			applyLayer(ctx, t, bytes.NewReader(readBlob(ctx, t, r, src, srcM.Layers[i])), orig)
		}
		diffID, n := applyLayer(ctx, t, bytes.NewReader(blob), conv)
		if diffID != diffIDs[i] {
			t.Errorf("layer %d %s: uncompressed digest %s, config diff_id %s", i, l.Digest, diffID, diffIDs[i])
		}
		if got := l.Annotations[estargz.StoreUncompressedSizeAnnotation]; got != strconv.FormatInt(n, 10) {
			t.Errorf("layer %d %s: uncompressed size annotation %q, want %d", i, l.Digest, got, n)
		}
		if !root {
			continue
		}
		a, b := snapshot(t, orig, nil), snapshot(t, conv, estargzNames)
		if diffs := diffTrees(a, b, 20); len(diffs) > 0 {
			t.Errorf("layer %d %s: trees differ:\n%s", i, l.Digest, strings.Join(diffs, "\n"))
		}
		if len(a) < 2 {
			t.Errorf("layer %d: original tree has only %d paths", i, len(a))
		}
	}
	return len(dstM.Layers)
}

// checkConfig checks that the new config differs from the old one in
// rootfs.diff_ids only, and returns those.
func checkConfig(ctx context.Context, t *testing.T, r *remote.Resolver, src string, srcDesc ocispec.Descriptor, dst string, dstDesc ocispec.Descriptor) []digest.Digest {
	t.Helper()
	var old, cur map[string]any
	if err := json.Unmarshal(readBlob(ctx, t, r, src, srcDesc), &old); err != nil {
		t.Fatal(err)
	}
	newBytes := readBlob(ctx, t, r, dst, dstDesc)
	if err := json.Unmarshal(newBytes, &cur); err != nil {
		t.Fatal(err)
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(newBytes, &cfg); err != nil {
		t.Fatal(err)
	}
	delete(old["rootfs"].(map[string]any), "diff_ids")
	delete(cur["rootfs"].(map[string]any), "diff_ids")
	if !reflect.DeepEqual(old, cur) {
		t.Errorf("config changed beyond diff_ids:\nold %v\nnew %v", old, cur)
	}
	if len(cfg.History) == 0 || len(cfg.Config.Cmd) == 0 {
		t.Errorf("config lost history or cmd: %+v", cfg)
	}
	return cfg.RootFS.DiffIDs
}

// checkLayer checks one converted layer blob: media type, annotations, TOC,
// order, and file contents read through the TOC.
func checkLayer(t *testing.T, l ocispec.Descriptor, blob []byte, zstd, prio bool, chunk int) {
	t.Helper()
	var d estargz.Decompressor = new(estargz.GzipDecompressor)
	wantType := ocispec.MediaTypeImageLayerGzip
	if zstd {
		d, wantType = new(zstdchunked.Decompressor), ocispec.MediaTypeImageLayerZstd
	}
	if l.MediaType != wantType {
		t.Errorf("layer %s: media type %q, want %q", l.Digest, l.MediaType, wantType)
	}
	tocDigest := digest.Digest(l.Annotations[estargz.TOCJSONDigestAnnotation])
	sr := io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob)))
	er, err := estargz.Open(sr, estargz.WithDecompressors(d))
	if err != nil {
		t.Fatalf("layer %s: open: %v", l.Digest, err)
	}
	if er.TOCDigest() != tocDigest {
		t.Errorf("layer %s: TOC digest %s, annotation %q", l.Digest, er.TOCDigest(), tocDigest)
	}
	if _, err := er.VerifyTOC(tocDigest); err != nil {
		t.Errorf("layer %s: verify TOC: %v", l.Digest, err)
	}
	if zstd {
		checkZstdAnnotations(t, l, blob)
	}

	toc := parseTOC(t, d, blob)
	checkOrder(t, l.Digest, toc, prio)
	checkChunks(t, l.Digest, er, toc, chunk)
}

// checkChunks reads file chunks through the TOC, as a lazy reader does, and
// checks them against their TOC digests: every chunk of files up to 8 MiB,
// the first and last of bigger ones.
func checkChunks(t *testing.T, dgst digest.Digest, er *estargz.Reader, toc *estargz.JTOC, chunk int) {
	t.Helper()
	sizes := make(map[string]int64)
	chunks := 0
	for _, e := range toc.Entries {
		if e.Type == "reg" {
			sizes[e.Name] = e.Size
		}
		if e.ChunkDigest == "" {
			continue
		}
		chunks++
		size := sizes[e.Name]
		n := e.ChunkSize
		if n == 0 {
			n = size - e.ChunkOffset
		}
		if chunk > 0 && n > int64(chunk) {
			t.Errorf("layer %s: %s has a chunk of %d bytes, more than --chunk-size", dgst, e.Name, n)
		}
		if size > 8<<20 && e.ChunkOffset != 0 && e.ChunkOffset+n != size {
			continue
		}
		f, err := er.OpenFile(e.Name)
		if err != nil {
			t.Fatalf("layer %s: open %s: %v", dgst, e.Name, err)
		}
		buf := make([]byte, n)
		if _, err := f.ReadAt(buf, e.ChunkOffset); err != nil && err != io.EOF {
			t.Fatalf("layer %s: read %s at %d: %v", dgst, e.Name, e.ChunkOffset, err)
		}
		if got := digest.FromBytes(buf).String(); got != e.ChunkDigest {
			t.Errorf("layer %s: %s at %d read through the TOC has digest %s, TOC says %s", dgst, e.Name, e.ChunkOffset, got, e.ChunkDigest)
		}
	}
	if chunk > 0 && chunks <= len(sizes) {
		t.Errorf("layer %s: %d chunks for %d files with --chunk-size", dgst, chunks, len(sizes))
	}
}

// checkZstdAnnotations checks the zstd:chunked annotations point at the
// compressed TOC.
func checkZstdAnnotations(t *testing.T, l ocispec.Descriptor, blob []byte) {
	t.Helper()
	var off, clen, ulen, kind int
	if _, err := fmt.Sscanf(l.Annotations[zstdchunked.ManifestPositionAnnotation], "%d:%d:%d:%d", &off, &clen, &ulen, &kind); err != nil {
		t.Fatalf("layer %s: position annotation %q: %v", l.Digest, l.Annotations[zstdchunked.ManifestPositionAnnotation], err)
	}
	if off+clen > len(blob) {
		t.Fatalf("layer %s: TOC at %d+%d past the blob's %d bytes", l.Digest, off, clen, len(blob))
	}
	if got := digest.FromBytes(blob[off : off+clen]).String(); got != l.Annotations[zstdchunked.ManifestChecksumAnnotation] {
		t.Errorf("layer %s: compressed TOC has digest %s, annotation %q", l.Digest, got, l.Annotations[zstdchunked.ManifestChecksumAnnotation])
	}
}

// parseTOC reads the blob's TOC, with its entries in order.
func parseTOC(t *testing.T, d estargz.Decompressor, blob []byte) *estargz.JTOC {
	t.Helper()
	size := int64(len(blob))
	_, tocOff, tocSize, err := d.ParseFooter(blob[size-d.FooterSize():])
	if err != nil {
		t.Fatal(err)
	}
	if tocSize <= 0 {
		tocSize = size - d.FooterSize() - tocOff
	}
	toc, _, err := d.ParseTOC(io.NewSectionReader(bytes.NewReader(blob), tocOff, tocSize))
	if err != nil {
		t.Fatal(err)
	}
	return toc
}

// checkOrder checks that the prioritized paths the layer has, with their
// parent directories and hardlink targets, come first, then the landmark.
func checkOrder(t *testing.T, dgst digest.Digest, toc *estargz.JTOC, prio bool) {
	t.Helper()
	clean := func(p string) string { return strings.TrimPrefix(path.Clean("/"+p), "/") }
	var names []string
	byName := make(map[string]*estargz.TOCEntry)
	for _, e := range toc.Entries {
		if e.Type != "chunk" {
			names = append(names, clean(e.Name))
			byName[clean(e.Name)] = e
		}
	}
	if !prio {
		if len(names) == 0 || names[0] != estargz.NoPrefetchLandmark {
			t.Errorf("layer %s: first entries %q, want %s first", dgst, names[:min(3, len(names))], estargz.NoPrefetchLandmark)
		}
		return
	}
	allowed := make(map[string]bool)
	var present []string
	for _, p := range prioritized {
		p = clean(p)
		e, ok := byName[p]
		if !ok {
			continue
		}
		present = append(present, p)
		for q := p; q != "."; q = path.Dir(q) {
			allowed[q] = true
		}
		if e.Type == "hardlink" {
			for q := clean(e.LinkName); q != "."; q = path.Dir(q) {
				allowed[q] = true
			}
		}
	}
	landmark := -1
	for i, n := range names {
		if n == estargz.PrefetchLandmark {
			landmark = i
			break
		}
		if !allowed[n] {
			t.Errorf("layer %s: %q comes before the landmark but was not prioritized", dgst, n)
		}
	}
	if landmark < 0 {
		t.Fatalf("layer %s: no %s", dgst, estargz.PrefetchLandmark)
	}
	for _, p := range present {
		if i := indexOf(names, p); i > landmark {
			t.Errorf("layer %s: prioritized %q at %d, after the landmark at %d", dgst, p, i, landmark)
		}
	}
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

func TestConvertErrors(t *testing.T) {
	addr := startRegistry(t)
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	pushSample(t, addr, "busybox:v1", "busybox")
	ctx := t.Context()
	hosts := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		want []string // in the error
	}{
		{"missing tag", []string{addr + "/busybox:nope", addr + "/x:y"}, []string{"resolve manifest nope from " + addr + "/busybox", "404", "registry unavailable"}},
		{"unreachable destination", []string{addr + "/busybox:v1", "127.0.0.1:1/x:y"}, []string{"layer 1/2 sha256:", "push blob sha256:", "to 127.0.0.1:1/x: check for blob:"}},
		{"destination digest", []string{addr + "/busybox:v1", addr + "/x@" + digest.FromString("x").String()}, []string{"DST", "has a digest"}},
		{"short name", []string{"busybox", addr + "/x:y"}, []string{"SRC: image reference \"busybox\": no repository"}},
		{"prioritize file", []string{"--prioritize", "/nonexistent/list", addr + "/busybox:v1", addr + "/x:y"}, []string{"--prioritize: open /nonexistent/list"}},
		{"chunk size", []string{"--chunk-size", "lots", addr + "/busybox:v1", addr + "/x:y"}, []string{"--chunk-size \"lots\""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"convert", "--hosts-dir", hosts}, tc.args...)
			stdout, _, err := runCLI(ctx, t, args...)
			if err == nil {
				t.Fatalf("converted: %s", stdout)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if stdout != "" {
				t.Errorf("stdout %q after a failure", stdout)
			}
		})
	}
}
