package lazy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/cache"
)

// TestStreamedTOC: the TOC decoded as a stream indexes to what
// estargz.Open's decoding gives, with the same digest.
func TestStreamedTOC(t *testing.T) {
	data, tocDigest := manyFiles(t, 1000)
	sr := io.NewSectionReader(bytes.NewReader(data), 0, int64(len(data)))
	want, err := estargz.Open(sr)
	if err != nil {
		t.Fatal(err)
	}
	got, err := openStreamed(bytes.NewReader(data), int64(len(data)), new(estargz.GzipDecompressor))
	if err != nil {
		t.Fatal(err)
	}
	if got.TOCDigest() != tocDigest || want.TOCDigest() != tocDigest {
		t.Errorf("TOC digest %s (estargz.Open: %s), want %s", got.TOCDigest(), want.TOCDigest(), tocDigest)
	}
	wantIx, err := buildIndex(want, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	gotIx, err := buildIndex(got, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// estargz.Open ends the last stream of file data at the blob's end,
	// past the TOC and footer; the streamed TOC's reader ends it where the
	// TOC starts, which is where it ends.
	tocOff, _, err := estargz.OpenFooter(sr)
	if err != nil {
		t.Fatal(err)
	}
	for i := range wantIx.chunks {
		if wantIx.chunks[i].end == int64(len(data)) {
			wantIx.chunks[i].end = tocOff
		}
	}
	for _, f := range []struct {
		name      string
		got, want any
	}{
		{"entries", gotIx.entries, wantIx.entries}, {"children", gotIx.children, wantIx.children},
		{"names", gotIx.names, wantIx.names}, {"chunks", gotIx.chunks, wantIx.chunks},
		{"links", gotIx.links, wantIx.links}, {"xattrs", gotIx.xattrs, wantIx.xattrs},
		{"byOffset", gotIx.byOffset, wantIx.byOffset}, {"prefetchEnd", gotIx.prefetchEnd, wantIx.prefetchEnd},
	} {
		if !reflect.DeepEqual(f.got, f.want) {
			t.Errorf("the index of the streamed TOC has other %s than estargz.Open's", f.name)
		}
	}
}

// TestReadTOCThenOpen: what ReadTOC records is all Open needs, read in as
// few requests as Open would make, and a TOC that is not the manifest's is
// refused.
func TestReadTOCThenOpen(t *testing.T) {
	plain, plainDesc, _ := buildLayer(t)
	exact, exactDesc := exactBlob(t, exactEntries(), nil)
	for _, tc := range []struct {
		name  string
		data  []byte
		desc  ocispec.Descriptor
		reads int64
	}{
		{"plain", plain, plainDesc, 2}, // footer, then TOC
		{"exact record", exact, exactDesc, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tocDigest, _ := Capable(tc.desc)
			ra := &countingReaderAt{r: bytes.NewReader(tc.data)}
			rec, err := ReadTOC(ra, tc.desc, tocDigest)
			if err != nil {
				t.Fatal(err)
			}
			if n := ra.reads.Load(); n != tc.reads {
				t.Errorf("ReadTOC made %d reads, want %d", n, tc.reads)
			}
			c, _ := cache.Open(context.Background(), t.TempDir(), 0)
			defer c.Close()
			l, err := Open(context.Background(), rec, &testBlob{data: tc.data}, tc.desc, tocDigest, Options{Cache: c})
			if err != nil {
				t.Fatalf("Open on the recorded TOC: %v", err)
			}
			defer l.Close()
			direct, err := Open(context.Background(), bytes.NewReader(tc.data), &testBlob{data: tc.data}, tc.desc, tocDigest, Options{Cache: c})
			if err != nil {
				t.Fatal(err)
			}
			defer direct.Close()
			if l.Entries() != direct.Entries() || l.View() != direct.View() {
				t.Errorf("from the recorded TOC: %d entries, view %q; from the blob: %d, %q",
					l.Entries(), l.View(), direct.Entries(), direct.View())
			}
			if _, err := ReadTOC(bytes.NewReader(tc.data), tc.desc, digest.FromString("another TOC")); !errors.Is(err, ErrTOCMismatch) {
				t.Errorf("ReadTOC with another TOC digest: %v, want ErrTOCMismatch", err)
			}
		})
	}
}

// TestOpenMemory: opening a layer allocates a bounded amount per entry,
// nothing in proportion to the TOC's JSON as a whole: estargz.Open's own
// decoding buffered the whole JSON, 2,900 bytes allocated per entry of
// this layer against 1,700 decoded as a stream into estargz's Reader and
// 1,210 into a tocTree (which keeps less: see BenchmarkOpenPeakHeap).
func TestOpenMemory(t *testing.T) {
	const files = 20000
	data, tocDigest := manyFiles(t, files)
	c, _ := cache.Open(context.Background(), t.TempDir(), 0)
	defer c.Close()
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(len(data))}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	l, err := Open(context.Background(), bytes.NewReader(data), nil, desc, tocDigest, Options{Cache: c})
	if err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	defer l.Close()
	perEntry := float64(after.TotalAlloc-before.TotalAlloc) / float64(l.Entries())
	t.Logf("Open allocated %.0f bytes per entry", perEntry)
	if perEntry > 2000 {
		t.Errorf("Open allocated %.0f bytes per entry, want at most 2000", perEntry)
	}
}

// TestOpenKeepsOneCopyOfTheTOC: Open of a TOC read ahead (ReadTOC) keeps
// that record instead of recording its bytes again, SaveTOC writes and
// forgets it, and what it wrote opens the layer again.
func TestOpenKeepsOneCopyOfTheTOC(t *testing.T) {
	data, desc, _ := buildLayer(t)
	tocDigest, _ := Capable(desc)
	rec, err := ReadTOC(bytes.NewReader(data), desc, tocDigest)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cache.Open(context.Background(), t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	l, err := Open(context.Background(), rec, &testBlob{data: data}, desc, tocDigest, Options{Cache: c})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if l.toc != rec {
		t.Error("Open recorded the TOC read ahead a second time")
	}
	path := filepath.Join(t.TempDir(), "toc")
	if err := l.SaveTOC(path); err != nil {
		t.Fatal(err)
	}
	if l.toc != nil {
		t.Error("the layer keeps its TOC bytes after SaveTOC")
	}
	if err := l.SaveTOC(path); err == nil {
		t.Error("a second SaveTOC succeeded with nothing to save")
	}
	saved, err := LoadRecorded(path)
	if err != nil {
		t.Fatal(err)
	}
	again, err := Open(context.Background(), saved, &testBlob{data: data}, desc, tocDigest, Options{Cache: c})
	if err != nil {
		t.Fatalf("open from the saved TOC: %v", err)
	}
	again.Close()
}
