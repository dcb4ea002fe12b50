package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/remote"
	"github.com/lazylayer/lazylayer/script/internal/registry"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
	"github.com/lazylayer/lazylayer/script/internal/treecmp"
)

// prioritized are the paths the convert tests place first: in the busybox
// and tricky layers, written the ways users may, and one that no layer has.
var prioritized = []string{
	"bin/busybox", "/etc/os-release", "./srv/hello.txt", "data/hl/two",
	"data/opaque/new.txt", "data/big/random-100m", "not/there",
}

// want is what a converted image's layers should look like.
type want struct {
	zstd  bool // zstd:chunked, else eStargz
	prio  bool // converted with --prioritize
	chunk int  // --chunk-size given, else 0
}

// runConvert runs `lazylayer convert` with args (flags, SRC, DST), reaching
// registries with no hosts.toml and no credentials; env is added to its
// environment. err is the command's, with its stderr.
func runConvert(t *testing.T, env []string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), lazylayerBin, append([]string{"convert", "--hosts-dir", t.TempDir()}, args...)...)
	cmd.Env = append(append(os.Environ(), "DOCKER_CONFIG="+t.TempDir()), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// convertImage runs `lazylayer convert` and returns the digest it printed
// for DST, the last of args, and what it logged.
func convertImage(t *testing.T, env []string, args ...string) (digest.Digest, string) {
	t.Helper()
	stdout, stderr, err := runConvert(t, env, args...)
	if err != nil {
		t.Fatalf("lazylayer convert %s: %v\nstderr:\n%s", strings.Join(args, " "), err, stderr)
	}
	dst := args[len(args)-1]
	m := regexp.MustCompile(`^` + regexp.QuoteMeta(dst) + `@(sha256:[0-9a-f]{64})\n$`).FindStringSubmatch(stdout)
	if m == nil {
		t.Fatalf("stdout %q, want %s@<digest>", stdout, dst)
	}
	return digest.Digest(m[1]), stderr
}

// newResolver returns a resolver for the registry at addr, over plain HTTP
// and without credentials.
func newResolver(t *testing.T, addr string) *remote.Resolver {
	t.Helper()
	hosts := t.TempDir()
	writeHosts(t, hosts, addr, addr)
	return remote.NewResolver(remote.Options{HostsDir: hosts, DockerConfig: t.TempDir()})
}

// TestConvert converts the busybox and tricky sample images to eStargz and
// zstd:chunked, and checks each layer blob, its TOC and annotations, the
// config, and that each layer applies to the same tree as the original's.
func TestConvert(t *testing.T) {
	reg := registry.StartT(t)
	push(t, reg.Addr(), "busybox:v1", testimage.Busybox())
	push(t, reg.Addr(), "tricky:v1", testimage.Tricky())
	prio := filepath.Join(t.TempDir(), "prioritize.txt")
	writeFile(t, prio, strings.Join(prioritized, "\n")+"\n\n")
	for _, tc := range []struct {
		image string
		want  want
		args  []string
	}{
		{"busybox", want{prio: true}, []string{"--prioritize", prio}},
		{"busybox", want{zstd: true, prio: true}, []string{"--zstdchunked", "--prioritize", prio}},
		{"busybox", want{chunk: 64 << 10}, []string{"--chunk-size", "64KiB"}},
		{"tricky", want{prio: true}, []string{"--prioritize", prio}},
		{"tricky", want{zstd: true, prio: true}, []string{"--zstdchunked", "--prioritize", prio}},
	} {
		format := "estargz"
		if tc.want.zstd {
			format = "zstdchunked"
		}
		name := tc.image + "/" + format
		if tc.want.chunk != 0 {
			name += "/chunk-size"
		}
		t.Run(name, func(t *testing.T) {
			src := reg.Addr() + "/" + tc.image + ":v1"
			dst := fmt.Sprintf("%s/converted/%s:%s-%d", reg.Addr(), tc.image, format, tc.want.chunk)
			dgst, stderr := convertImage(t, nil, append(tc.args, src, dst)...)
			t.Logf("stderr:\n%s", stderr)
			if tc.want.prio && !regexp.MustCompile(`warning: no layer has these prioritized paths: .*\bnot/there\n`).MatchString(stderr) {
				t.Errorf("stderr does not warn that no layer has the prioritized not/there")
			}
			n := checkImage(t, src, dst, dgst, tc.want)
			if lines := strings.Count("\n"+stderr, "\nlayer "); lines != n {
				t.Errorf("stderr has %d layer lines, want %d", lines, n)
			}
		})
	}
}

// TestConvertReproducible converts an image on what looks to estargz like
// machines with 1 and with 3 CPUs: the results are the same bytes.
func TestConvertReproducible(t *testing.T) {
	reg := registry.StartT(t)
	src := push(t, reg.Addr(), "busybox:v1", testimage.Busybox())
	for _, format := range []string{"estargz", "zstdchunked"} {
		t.Run(format, func(t *testing.T) {
			var args []string
			if format == "zstdchunked" {
				args = []string{"--zstdchunked"}
			}
			var got []digest.Digest
			for _, procs := range []int{1, 3, 3} {
				dst := fmt.Sprintf("%s/converted/busybox:%s-%d-%d", reg.Addr(), format, procs, len(got))
				dgst, _ := convertImage(t, []string{"GOMAXPROCS=" + strconv.Itoa(procs)}, append(args, src.ref, dst)...)
				got = append(got, dgst)
			}
			if got[0] != got[1] || got[1] != got[2] {
				t.Errorf("manifest digests %s with GOMAXPROCS=1, %s and %s with GOMAXPROCS=3: want one", got[0], got[1], got[2])
			}
		})
	}
}

// checkImage checks the image dst, pushed as dgst, against src and returns
// its number of layers.
func checkImage(t *testing.T, src, dst string, dgst digest.Digest, w want) int {
	t.Helper()
	ctx := t.Context()
	host, _, _ := strings.Cut(dst, "/")
	r := newResolver(t, host)
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
	diffIDs := checkConfig(t, r, src, srcM.Config, dst, dstM.Config)
	for i, l := range dstM.Layers {
		blob := readBlob(t, r, dst, l)
		checkLayer(t, l, blob, w)
		orig, conv := t.TempDir(), t.TempDir()
		applyLayer(t, readBlob(t, r, src, srcM.Layers[i]), orig)
		diffID, n := applyLayer(t, blob, conv)
		if diffID != diffIDs[i] {
			t.Errorf("layer %d %s: uncompressed digest %s, config diff_id %s", i, l.Digest, diffID, diffIDs[i])
		}
		if got := l.Annotations[estargz.StoreUncompressedSizeAnnotation]; got != strconv.FormatInt(n, 10) {
			t.Errorf("layer %d %s: uncompressed size annotation %q, want %d", i, l.Digest, got, n)
		}
		a, b := layerTree(t, orig), layerTree(t, conv)
		if len(a) < 2 {
			t.Errorf("layer %d: original tree has only %d paths", i, len(a))
		}
		diffs := treecmp.Diff(a, b)
		if len(diffs) > 20 {
			diffs = append(diffs[:20], fmt.Sprintf("… and %d more", len(diffs)-20))
		}
		if len(diffs) > 0 {
			t.Errorf("layer %d %s: trees differ (a original, b converted):\n%s", i, l.Digest, strings.Join(diffs, "\n"))
		}
	}
	return len(dstM.Layers)
}

// checkConfig checks that the new config differs from the old one in
// rootfs.diff_ids only, and returns those.
func checkConfig(t *testing.T, r *remote.Resolver, src string, srcDesc ocispec.Descriptor, dst string, dstDesc ocispec.Descriptor) []digest.Digest {
	t.Helper()
	var old, cur map[string]any
	if err := json.Unmarshal(readBlob(t, r, src, srcDesc), &old); err != nil {
		t.Fatal(err)
	}
	newBytes := readBlob(t, r, dst, dstDesc)
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
func checkLayer(t *testing.T, l ocispec.Descriptor, blob []byte, w want) {
	t.Helper()
	var d estargz.Decompressor = new(estargz.GzipDecompressor)
	wantType := ocispec.MediaTypeImageLayerGzip
	if w.zstd {
		d, wantType = new(zstdchunked.Decompressor), ocispec.MediaTypeImageLayerZstd
	}
	if l.MediaType != wantType {
		t.Errorf("layer %s: media type %q, want %q", l.Digest, l.MediaType, wantType)
	}
	tocDigest := digest.Digest(l.Annotations[estargz.TOCJSONDigestAnnotation])
	er, err := estargz.Open(io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob))), estargz.WithDecompressors(d))
	if err != nil {
		t.Fatalf("layer %s: open: %v", l.Digest, err)
	}
	if er.TOCDigest() != tocDigest {
		t.Errorf("layer %s: TOC digest %s, annotation %q", l.Digest, er.TOCDigest(), tocDigest)
	}
	if _, err := er.VerifyTOC(tocDigest); err != nil {
		t.Errorf("layer %s: verify TOC: %v", l.Digest, err)
	}
	if w.zstd {
		checkZstdAnnotations(t, l, blob)
	}
	toc := parseTOC(t, d, blob)
	checkOrder(t, l.Digest, toc, w.prio)
	checkChunks(t, l.Digest, er, toc, w.chunk)
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
	pos := l.Annotations[zstdchunked.ManifestPositionAnnotation]
	var off, clen, ulen, kind int
	if _, err := fmt.Sscanf(pos, "%d:%d:%d:%d", &off, &clen, &ulen, &kind); err != nil {
		t.Fatalf("layer %s: position annotation %q: %v", l.Digest, pos, err)
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
// parent directories and hardlink targets, come first, then the landmark;
// without prioritized paths, the no-prefetch landmark comes first.
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
	landmark := slices.Index(names, estargz.PrefetchLandmark)
	if landmark < 0 {
		t.Fatalf("layer %s: no %s", dgst, estargz.PrefetchLandmark)
	}
	for _, n := range names[:landmark] {
		if !allowed[n] {
			t.Errorf("layer %s: %q comes before the landmark but was not prioritized", dgst, n)
		}
	}
	for _, p := range present {
		if i := slices.Index(names, p); i > landmark {
			t.Errorf("layer %s: prioritized %q at %d, after the landmark at %d", dgst, p, i, landmark)
		}
	}
}

// readBlob reads the blob desc of ref and checks its digest and size.
func readBlob(t *testing.T, r *remote.Resolver, ref string, desc ocispec.Descriptor) []byte {
	t.Helper()
	ctx := t.Context()
	b, err := r.Blob(ctx, ref, desc)
	if err != nil {
		t.Fatal(err)
	}
	s := b.Stream(ctx)
	defer s.Close()
	data, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("read %s: %v", desc.Digest, err)
	}
	if got := digest.FromBytes(data); got != desc.Digest || int64(len(data)) != desc.Size {
		t.Fatalf("blob %s: got %d bytes with digest %s, want %d", desc.Digest, len(data), got, desc.Size)
	}
	return data
}

// applyLayer decompresses the layer blob and applies it on dir with
// containerd's applier, converting whiteouts for overlay, as for a layer of
// its own. It returns the digest and size of the tar.
func applyLayer(t *testing.T, blob []byte, dir string) (digest.Digest, int64) {
	t.Helper()
	d, err := compression.DecompressStream(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	dg := digest.Canonical.Digester()
	c := &countingWriter{w: dg.Hash()}
	tar := io.TeeReader(d, c)
	if _, err := archive.Apply(t.Context(), dir, tar, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)); err != nil {
		t.Fatalf("apply: %v", err)
	}
	// Apply stops at the tar's end marker; the digest covers the padding too.
	if _, err := io.Copy(io.Discard, tar); err != nil {
		t.Fatalf("read tar: %v", err)
	}
	return dg.Digest(), c.n
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// layerTree snapshots a layer applied on dir, leaving out what the layer
// cannot fix: the entries estargz and lazylayer add at the root (TOC,
// landmarks, exact record), and
// the mtimes of the root and of overlay whiteouts, which the applier makes
// when it applies.
func layerTree(t *testing.T, dir string) map[string]treecmp.Info {
	t.Helper()
	var added []string
	for _, n := range lazy.FormatNames() {
		added = append(added, "/"+n)
	}
	opts := treecmp.Options{Skip: func(p string) bool { return slices.Contains(added, p) }}
	tree, err := opts.Snapshot(t.Context(), dir)
	if err != nil {
		t.Fatal(err)
	}
	for p, info := range tree {
		if p == "/" || (info.Type() == unix.S_IFCHR && info.Rdev == 0) {
			info.Mtime = time.Time{}
			tree[p] = info
		}
	}
	return tree
}

// TestConvertPushFails: a destination that cannot be reached fails the
// conversion with exit status 1 and an error naming the layer, blob and
// host on stderr; stdout stays empty. Errors found before any registry
// answers are cmd/lazylayer's unit tests.
func TestConvertPushFails(t *testing.T) {
	reg := registry.StartT(t)
	src := push(t, reg.Addr(), "busybox:v1", testimage.Busybox())
	stdout, stderr, err := runConvert(t, nil, src.ref, "127.0.0.1:1/x:y")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("convert: %v, want exit status 1; stdout %q", err, stdout)
	}
	for _, w := range []string{"lazylayer: ", "layer 1/2 sha256:", "push blob sha256:", "to 127.0.0.1:1/x: check for blob:"} {
		if !strings.Contains(stderr, w) {
			t.Errorf("stderr %q does not say %q", stderr, w)
		}
	}
	if stdout != "" {
		t.Errorf("stdout %q after a failure", stdout)
	}
}

// TestConvertIndex converts an index with two platforms of one annotated
// image and an attestation, and checks what is kept and what left out.
func TestConvertIndex(t *testing.T) {
	reg := registry.StartT(t)
	push(t, reg.Addr(), "busybox:v1", testimage.Busybox())
	ctx := t.Context()
	r := newResolver(t, reg.Addr())
	src := reg.Addr() + "/busybox"

	// The sample manifest, annotated, and an index of it.
	m := sourceManifest(t, r, src+":v1")
	m.Annotations = map[string]string{"org.opencontainers.image.title": "busybox & <friends>"}
	m.Layers[1].Annotations = map[string]string{"org.example.layer": "kept", estargz.TOCJSONDigestAnnotation: "sha256:stale"}
	mdesc := pushManifest(t, r, src, ocispec.MediaTypeImageManifest, m)
	// An attestation of it, as BuildKit lists them; its content matters not.
	att := pushManifest(t, r, src, ocispec.MediaTypeImageManifest, ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: m.Config, Layers: []ocispec.Descriptor{},
	})
	att.Platform = &ocispec.Platform{OS: "unknown", Architecture: "unknown"}
	att.Annotations = map[string]string{"vnd.docker.reference.type": "attestation-manifest"}
	entry := func(arch string) ocispec.Descriptor {
		d := mdesc
		d.Platform = &ocispec.Platform{OS: "linux", Architecture: arch}
		d.Annotations = map[string]string{"org.example.arch": arch}
		return d
	}
	idx := ocispec.Index{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   ocispec.MediaTypeImageIndex,
		Manifests:   []ocispec.Descriptor{entry("amd64"), entry("arm64"), att},
		Annotations: map[string]string{"org.example.index": "kept"},
	}
	ib, err := json.Marshal(idx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.PushManifest(ctx, src+":multi", ocispec.MediaTypeImageIndex, ib); err != nil {
		t.Fatal(err)
	}

	dst := reg.Addr() + "/converted/busybox:multi"
	dgst, stderr := convertImage(t, nil, src+":multi", dst)
	t.Logf("stderr:\n%s", stderr)
	for _, want := range []string{"leaving out attestation manifest", "linux/amd64 layer 1/2 sha256:", "linux/amd64 layer 2/2 sha256:"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q", want)
		}
	}
	got, err := r.Resolve(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != dgst || got.MediaType != ocispec.MediaTypeImageIndex {
		t.Fatalf("%s resolves to %+v, want index %s", dst, got, dgst)
	}
	out, err := r.Index(ctx, dst, got.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if out.Annotations["org.example.index"] != "kept" || len(out.Manifests) != 2 {
		t.Fatalf("index %+v: want its annotation and two manifests", out)
	}
	for i, arch := range []string{"amd64", "arm64"} {
		e := out.Manifests[i]
		if e.Platform == nil || e.Platform.Architecture != arch || e.Annotations["org.example.arch"] != arch ||
			e.MediaType != ocispec.MediaTypeImageManifest || e.Digest != out.Manifests[0].Digest {
			t.Errorf("manifest %d: %+v", i, e)
		}
	}
	cm, err := r.Manifest(ctx, dst, out.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	if cm.Annotations["org.opencontainers.image.title"] != "busybox & <friends>" {
		t.Errorf("manifest annotations %v", cm.Annotations)
	}
	if a := cm.Layers[1].Annotations; a["org.example.layer"] != "kept" || a[estargz.TOCJSONDigestAnnotation] == "sha256:stale" {
		t.Errorf("layer annotations %v: want org.example.layer kept and a new TOC digest", a)
	}
	checkImage(t, src+":v1", dst+"@"+out.Manifests[0].Digest.String(), out.Manifests[0].Digest, want{})
}

// TestConvertDockerTypes converts a docker manifest list of a docker schema 2
// manifest: the result has OCI media types throughout.
func TestConvertDockerTypes(t *testing.T) {
	reg := registry.StartT(t)
	push(t, reg.Addr(), "busybox:v1", testimage.Busybox())
	ctx := t.Context()
	r := newResolver(t, reg.Addr())
	src := reg.Addr() + "/busybox"
	m := sourceManifest(t, r, src+":v1")
	m.MediaType = images.MediaTypeDockerSchema2Manifest
	m.Config.MediaType = images.MediaTypeDockerSchema2Config
	m.Layers[0].MediaType = images.MediaTypeDockerSchema2LayerGzip
	m.Layers[1].MediaType = images.MediaTypeDockerSchema2LayerZstd
	mdesc := pushManifest(t, r, src, m.MediaType, m)
	list := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"manifests":[{"mediaType":%q,"digest":%q,"size":%d,"platform":{"architecture":"amd64","os":"linux"}}]}`,
		images.MediaTypeDockerSchema2ManifestList, m.MediaType, mdesc.Digest, mdesc.Size)
	if _, err := r.PushManifest(ctx, src+":docker", images.MediaTypeDockerSchema2ManifestList, []byte(list)); err != nil {
		t.Fatal(err)
	}

	dst := reg.Addr() + "/converted/busybox:docker"
	dgst, _ := convertImage(t, nil, "--zstdchunked", src+":docker", dst)
	got, err := r.Resolve(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := r.Index(ctx, dst, dgst)
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != dgst || got.MediaType != ocispec.MediaTypeImageIndex || idx.MediaType != ocispec.MediaTypeImageIndex ||
		len(idx.Manifests) != 1 || idx.Manifests[0].MediaType != ocispec.MediaTypeImageManifest {
		t.Fatalf("converted index %+v (%s resolves to %+v, want index %s)", idx, dst, got, dgst)
	}
	checkImage(t, src+":v1", dst+"@"+idx.Manifests[0].Digest.String(), idx.Manifests[0].Digest, want{zstd: true})
}

// sourceManifest returns the image manifest ref names.
func sourceManifest(t *testing.T, r *remote.Resolver, ref string) ocispec.Manifest {
	t.Helper()
	desc, err := r.Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.Manifest(t.Context(), ref, desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// pushManifest pushes v, JSON-encoded, by digest to the repository repo and
// returns its descriptor.
func pushManifest(t *testing.T, r *remote.Resolver, repo, mediaType string, v any) ocispec.Descriptor {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	dgst, err := r.PushManifest(t.Context(), repo+"@"+digest.FromBytes(b).String(), mediaType, b)
	if err != nil {
		t.Fatal(err)
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: dgst, Size: int64(len(b))}
}
