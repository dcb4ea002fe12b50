package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/cache"
	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/remote"
)

// fakeRegistry serves one manifest and its layers from memory.
type fakeRegistry struct {
	manifest ocispec.Manifest
	blobs    map[digest.Digest][]byte
	fail     error // returned by every Open

	mu    sync.Mutex
	opens map[digest.Digest]int // Opens per blob; guarded by mu
}

func (f *fakeRegistry) Manifest(ctx context.Context, ref string, dgst digest.Digest) (ocispec.Manifest, error) {
	return f.manifest, nil
}

func (f *fakeRegistry) Open(ctx context.Context, ref string, desc ocispec.Descriptor) (io.ReadCloser, error) {
	f.mu.Lock()
	f.opens[desc.Digest]++
	f.mu.Unlock()
	if f.fail != nil {
		return nil, f.fail
	}
	return io.NopCloser(bytes.NewReader(f.blobs[desc.Digest])), nil
}

func (f *fakeRegistry) openCount(d digest.Digest) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.opens[d]
}

func (f *fakeRegistry) Ranges(ctx context.Context, ref string, desc ocispec.Descriptor) (lazy.Blob, error) {
	b, ok := f.blobs[desc.Digest]
	if !ok {
		return nil, errors.New("no such blob")
	}
	return fakeBlob{f: f, d: desc.Digest, b: b}, nil
}

// fakeBlob serves ranges of a blob and counts them in its registry's opens.
type fakeBlob struct {
	f *fakeRegistry
	d digest.Digest
	b []byte
}

func (b fakeBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	b.f.mu.Lock()
	b.f.opens[b.d]++
	b.f.mu.Unlock()
	return io.NopCloser(bytes.NewReader(b.b[off : off+n])), nil
}

// tarOf is a tar of one regular file.
func tarOf(name, content string) []byte {
	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(content))})
	io.WriteString(tw, content)
	tw.Close()
	return tarBuf.Bytes()
}

func gzipLayer(t *testing.T, name, content string) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(tarOf(name, content))
	zw.Close()
	return buf.Bytes()
}

func newFake(t *testing.T, layers ...[]byte) *fakeRegistry {
	f := &fakeRegistry{blobs: map[digest.Digest][]byte{}, opens: map[digest.Digest]int{}}
	for _, b := range layers {
		d := digest.FromBytes(b)
		f.blobs[d] = b
		f.manifest.Layers = append(f.manifest.Layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: d, Size: int64(len(b))})
	}
	return f
}

func labelsFor(f *fakeRegistry, i int) map[string]string {
	var all string
	for j, l := range f.manifest.Layers[i:] {
		if j > 0 {
			all += ","
		}
		all += l.Digest.String()
	}
	return map[string]string{
		labelImageRef:    "registry.test/img:1",
		labelManifest:    digest.FromString("manifest").String(),
		labelLayer:       f.manifest.Layers[i].Digest.String(),
		labelImageLayers: all,
	}
}

func snapshotDir(t *testing.T) string {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "fs"), 0o755)
	os.Mkdir(filepath.Join(dir, "lazy"), 0o755)
	return dir
}

func newManager(t *testing.T, reg Registry) *Manager {
	m, err := New(context.Background(), reg, Config{Staging: filepath.Join(t.TempDir(), "staging")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestPrepareFetchesAhead(t *testing.T) {
	f := newFake(t, gzipLayer(t, "a", "first"), gzipLayer(t, "b", "second"))
	m := newManager(t, f)
	for i, want := range []string{"first", "second"} {
		dir := snapshotDir(t)
		ll, err := m.Prepare(context.Background(), dir, nil, labelsFor(f, i))
		if err != nil || ll != nil {
			t.Fatalf("layer %d: lazy %v, %v", i, ll != nil, err)
		}
		name := []string{"a", "b"}[i]
		if b, err := os.ReadFile(filepath.Join(dir, "fs", name)); err != nil || string(b) != want {
			t.Errorf("layer %d: %s is %q, %v", i, name, b, err)
		}
		if i == 0 {
			// The layer above was fetched without being asked for.
			second := f.manifest.Layers[1].Digest
			deadline := time.Now().Add(5 * time.Second)
			for f.openCount(second) == 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if f.openCount(second) == 0 {
				t.Fatal("the second layer was not fetched ahead")
			}
		}
	}
	for d, n := range f.opens {
		if n != 1 {
			t.Errorf("blob %s was fetched %d times", d, n)
		}
	}
	if entries, _ := os.ReadDir(m.cfg.Staging); len(entries) != 0 {
		t.Errorf("staging keeps %d trees", len(entries))
	}
}

// estargzLayer is a one-file eStargz layer and its descriptor.
func estargzLayer(t *testing.T, name, content string) ([]byte, ocispec.Descriptor) {
	tb := tarOf(name, content)
	rc, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tb), 0, int64(len(tb))))
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b, ocispec.Descriptor{
		MediaType:   ocispec.MediaTypeImageLayerGzip,
		Digest:      digest.FromBytes(b),
		Size:        int64(len(b)),
		Annotations: map[string]string{lazy.TOCDigestAnnotation: rc.TOCDigest().String()},
	}
}

// TestPrepareReadsTOCsAhead: while containerd prepares an image's first
// lazy layer, the TOCs of the others are read, so their Prepare needs no
// round trip to the registry.
func TestPrepareReadsTOCsAhead(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	f := &fakeRegistry{blobs: map[digest.Digest][]byte{}, opens: map[digest.Digest]int{}}
	for _, name := range []string{"a", "b"} {
		b, desc := estargzLayer(t, name, "layer "+name)
		f.blobs[desc.Digest] = b
		f.manifest.Layers = append(f.manifest.Layers, desc)
	}
	c, err := cache.Open(context.Background(), t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	m, err := New(context.Background(), f, Config{Staging: filepath.Join(t.TempDir(), "staging"), Lazy: lazy.Options{Cache: c}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })

	if ll, err := m.Prepare(context.Background(), snapshotDir(t), nil, labelsFor(f, 0)); err != nil || ll == nil {
		t.Fatalf("first layer: lazy %v, %v", ll != nil, err)
	}
	second := f.manifest.Layers[1].Digest
	m.mu.Lock()
	j := m.tocs[second]
	m.mu.Unlock()
	if j == nil {
		t.Fatal("the second layer's TOC is not being read ahead")
	}
	<-j.done
	if j.err != nil {
		t.Fatalf("reading the TOC ahead: %v", j.err)
	}
	before := f.openCount(second)
	dir := snapshotDir(t)
	if ll, err := m.Prepare(context.Background(), dir, nil, labelsFor(f, 1)); err != nil || ll == nil {
		t.Fatalf("second layer: lazy %v, %v", ll != nil, err)
	}
	if n := f.openCount(second) - before; n != 0 {
		t.Errorf("preparing the second layer made %d requests; its TOC was read ahead", n)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "lazy", "b")); err != nil || string(b) != "layer b" {
		t.Errorf("second layer's file: %q, %v", b, err)
	}
}

func TestPrepareClassifiesFailures(t *testing.T) {
	good := gzipLayer(t, "a", "content")
	for _, tc := range []struct {
		name     string
		reg      func() *fakeRegistry
		dataLoss bool
	}{
		{"registry down", func() *fakeRegistry {
			f := newFake(t, good)
			f.fail = remote.ErrUnavailable
			return f
		}, false},
		{"wrong bytes", func() *fakeRegistry {
			f := newFake(t, good)
			f.blobs[f.manifest.Layers[0].Digest] = gzipLayer(t, "a", "tampered")
			return f
		}, true},
		{"bad reply", func() *fakeRegistry {
			f := newFake(t, good)
			f.fail = remote.ErrBadData
			return f
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.reg()
			_, err := newManager(t, f).Prepare(context.Background(), snapshotDir(t), nil, labelsFor(f, 0))
			if err == nil {
				t.Fatal("Prepare succeeded")
			}
			if errdefs.IsDataLoss(err) != tc.dataLoss {
				t.Errorf("IsDataLoss(%v) = %v, want %v", err, !tc.dataLoss, tc.dataLoss)
			}
		})
	}
}
