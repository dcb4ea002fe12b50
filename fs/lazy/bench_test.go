package lazy

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/cache"
)

// manyFiles builds an eStargz blob with n small files in 100 per directory.
func manyFiles(b testing.TB, n int) ([]byte, digest.Digest) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i := 0; i < n; i++ {
		if i%100 == 0 {
			tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("usr/lib/d%05d/", i/100), Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mtime})
		}
		body := fmt.Sprintf("file %d\n", i)
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("usr/lib/d%05d/module-%06d.py", i/100, i), Typeflag: tar.TypeReg,
			Mode: 0o644, Size: int64(len(body)), ModTime: mtime})
		io.WriteString(tw, body)
	}
	tw.Close()
	rc, err := estargz.Build(io.NewSectionReader(bytes.NewReader(buf.Bytes()), 0, int64(buf.Len())))
	if err != nil {
		b.Fatal(err)
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		b.Fatal(err)
	}
	return data, rc.TOCDigest()
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// BenchmarkIndexMemory reports the heap a lazy layer of 100k files keeps
// once its TOC is indexed: bytes per TOC entry (goal: under 300).
func BenchmarkIndexMemory(b *testing.B) {
	const files = 100000
	data, tocDigest := manyFiles(b, files)
	c, _ := cache.Open(context.Background(), b.TempDir(), 0)
	defer c.Close()
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(len(data))}
	var perEntry float64
	var opening time.Duration
	for i := 0; i < b.N; i++ {
		before := heapInUse()
		start := time.Now()
		l, err := Open(context.Background(), bytes.NewReader(data), nil, desc, tocDigest, Options{Cache: c})
		if err != nil {
			b.Fatal(err)
		}
		opening += time.Since(start)
		l.toc = nil // the recorded TOC bytes are saved to disk, not kept by the daemon
		after := heapInUse()
		perEntry = float64(after-before) / float64(l.Entries())
		runtime.KeepAlive(l)
	}
	b.ReportMetric(perEntry, "bytes/entry")
	b.ReportMetric(float64(opening.Milliseconds())/float64(b.N), "open-ms")
}

// BenchmarkWarmSequentialRead reads a 1 GiB file through the lazy mount
// once it is cached, and the same bytes from a file on the local disk, and
// reports the ratio.
func BenchmarkWarmSequentialRead(b *testing.B) {
	if os.Getuid() != 0 {
		b.Skip("needs root")
	}
	const size = 1 << 30
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "big", Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: mtime})
	chunk := bytes.Repeat([]byte("lazylayer "), 1<<16)
	for n := 0; n < size; n += len(chunk) {
		tw.Write(chunk[:min(len(chunk), size-n)])
	}
	tw.Close()
	rc, err := estargz.Build(io.NewSectionReader(bytes.NewReader(buf.Bytes()), 0, int64(buf.Len())), estargz.WithChunkSize(4<<20))
	if err != nil {
		b.Fatal(err)
	}
	data, _ := io.ReadAll(rc)
	rc.Close()
	blob := &testBlob{data: data}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(len(data))}
	c, _ := cache.Open(context.Background(), b.TempDir(), 0)
	defer c.Close()
	l, err := Open(context.Background(), bytes.NewReader(data), blob, desc, rc.TOCDigest(), Options{Cache: c})
	if err != nil {
		b.Fatal(err)
	}
	mnt := filepath.Join(b.TempDir(), "lazy")
	os.Mkdir(mnt, 0o755)
	if err := l.Mount(context.Background(), mnt); err != nil {
		b.Fatal(err)
	}
	defer func() { done, _ := l.Unmount(); <-done }()
	local := filepath.Join(b.TempDir(), "big")
	os.WriteFile(local, buf.Bytes()[512:512+size], 0o644)

	readAll := func(path string) time.Duration {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		start := time.Now()
		p := make([]byte, 1<<20)
		for {
			if _, err := f.Read(p); err == io.EOF {
				break
			} else if err != nil {
				b.Fatal(err)
			}
		}
		return time.Since(start)
	}
	readAll(filepath.Join(mnt, "big")) // cold: fetch and cache
	readAll(local)
	readsBefore := l.Stats().Reads
	b.ResetTimer()
	var lazy, ext time.Duration
	for i := 0; i < b.N; i++ {
		lazy += readAll(filepath.Join(mnt, "big"))
		ext += readAll(local)
	}
	b.ReportMetric(float64(size)*float64(b.N)/lazy.Seconds()/1e9, "lazy-GB/s")
	b.ReportMetric(float64(size)*float64(b.N)/ext.Seconds()/1e9, "local-GB/s")
	b.ReportMetric(ext.Seconds()/lazy.Seconds(), "ratio")
	b.ReportMetric(float64(l.Stats().Reads-readsBefore)/float64(b.N), "daemon-reads/op")
}

// BenchmarkOpenMany opens, reads and closes 5000 small files of a local
// layer through the lazy mount (what tar over /usr does in a container
// started lazily) and from the local tree, and reports the ratio.
func BenchmarkOpenMany(b *testing.B) {
	if os.Getuid() != 0 {
		b.Skip("needs root")
	}
	const files = 5000
	data, tocDigest := manyFiles(b, files)
	blob := &testBlob{data: data}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(len(data))}
	c, _ := cache.Open(context.Background(), b.TempDir(), 0)
	defer c.Close()
	passthrough, _ := PassthroughSupport(b.TempDir())
	l, err := Open(context.Background(), bytes.NewReader(data), blob, desc, tocDigest,
		Options{Cache: c, BlobPath: filepath.Join(b.TempDir(), "blob"), Passthrough: passthrough})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	mnt := filepath.Join(b.TempDir(), "lazy")
	os.Mkdir(mnt, 0o755)
	if err := l.Mount(context.Background(), mnt); err != nil {
		b.Fatal(err)
	}
	defer func() { done, _ := l.Unmount(); <-done }()
	tree := filepath.Join(b.TempDir(), "fs")
	os.Mkdir(tree, 0o755)
	if err := l.Populate(context.Background(), tree, PopulateOptions{}); err != nil {
		b.Fatal(err)
	}
	l.SetLocal(tree)
	walk := func(root string) time.Duration {
		start := time.Now()
		buf := make([]byte, 4096)
		for i := 0; i < files; i++ {
			f, err := os.Open(fmt.Sprintf("%s/usr/lib/d%05d/module-%06d.py", root, i/100, i))
			if err != nil {
				b.Fatal(err)
			}
			f.Read(buf)
			f.Close()
		}
		return time.Since(start)
	}
	walk(mnt)
	walk(tree)
	b.ResetTimer()
	var lazy, local time.Duration
	for i := 0; i < b.N; i++ {
		lazy += walk(mnt)
		local += walk(tree)
	}
	b.ReportMetric(float64(lazy.Microseconds())/float64(b.N*files), "lazy-µs/file")
	b.ReportMetric(float64(local.Microseconds())/float64(b.N*files), "local-µs/file")
	b.ReportMetric(local.Seconds()/lazy.Seconds(), "ratio")
}

// BenchmarkCachedRead reads a 16 MiB file of 4 MiB chunks, all cached, 128
// KiB at a time (what the kernel asks of a FUSE file at once), without a
// mount: the cost of serving reads from the chunk cache.
func BenchmarkCachedRead(b *testing.B) {
	const size = 16 << 20
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "big", Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: mtime})
	tw.Write(randomBytes(2, size))
	tw.Close()
	rc, err := estargz.Build(io.NewSectionReader(bytes.NewReader(buf.Bytes()), 0, int64(buf.Len())), estargz.WithChunkSize(4<<20))
	if err != nil {
		b.Fatal(err)
	}
	data, _ := io.ReadAll(rc)
	rc.Close()
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(len(data))}
	c, err := cache.Open(context.Background(), b.TempDir(), 0)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	l, err := Open(context.Background(), bytes.NewReader(data), &testBlob{data: data}, desc, rc.TOCDigest(),
		Options{Cache: c, BlobPath: filepath.Join(b.TempDir(), "blob")})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	readAll := func() {
		p := make([]byte, 128<<10)
		for off := int64(0); off < size; off += int64(len(p)) {
			if _, err := readFile(context.Background(), l, "big", p, off); err != nil {
				b.Fatal(err)
			}
		}
	}
	readAll() // fetch and cache
	b.SetBytes(size)
	b.ResetTimer()
	for range b.N {
		readAll()
	}
}

// liveHeap returns the bytes of live heap objects after a full collection.
func liveHeap() uint64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// BenchmarkOpenPeakHeap reports, for a layer of 50,000 files, the live
// heap at the peak of opening it, when the TOC's tree and the index being
// built are both alive, and what each holds: the tree as estargz's Reader
// (what openTOC built before tocTree) and as tocTree. The footer and TOC
// bytes read (kept by the layer's record) are counted in none of them.
func BenchmarkOpenPeakHeap(b *testing.B) {
	const files = 50000
	data, _ := manyFiles(b, files)
	size := int64(len(data))
	noLinks := func() (map[string]*linkAttrs, error) { return nil, nil }
	for _, tc := range []struct {
		name  string
		index func(ra io.ReaderAt, dec estargz.Decompressor) (tree any, build func() (*index, error), err error)
	}{
		{"estargz", func(ra io.ReaderAt, dec estargz.Decompressor) (any, func() (*index, error), error) {
			r, err := openStreamed(ra, size, dec)
			return r, func() (*index, error) { return buildIndex(r, nil, noLinks) }, err
		}},
		{"tocTree", func(ra io.ReaderAt, dec estargz.Decompressor) (any, func() (*index, error), error) {
			t, _, err := openTree(ra, size, dec)
			return t, func() (*index, error) { return buildIndexFrom[uint32](t, nil, noLinks) }, err
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var tree, peak, ix uint64
			for i := 0; i < b.N; i++ {
				dec := new(estargz.GzipDecompressor)
				rec := &Recorded{src: bytes.NewReader(data)}
				if _, err := readTOCRange(rec, size, dec); err != nil {
					b.Fatal(err)
				}
				base := liveHeap()
				t, build, err := tc.index(rec, dec)
				if err != nil {
					b.Fatal(err)
				}
				tree = liveHeap() - base
				index, err := build()
				if err != nil {
					b.Fatal(err)
				}
				peak = liveHeap() - base
				runtime.KeepAlive(t)
				t, build = nil, nil
				ix = liveHeap() - base
				runtime.KeepAlive(index)
				runtime.KeepAlive(rec)
			}
			b.ReportMetric(float64(peak)/1e6, "peak-MB")
			b.ReportMetric(float64(tree)/1e6, "tree-MB")
			b.ReportMetric(float64(ix)/1e6, "index-MB")
		})
	}
}
