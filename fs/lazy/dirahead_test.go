package lazy

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// dirsLayer opens a layer holding d/big (512 KiB), then d/f000-d/f029 and
// e/f000-e/f009 (10 KiB each), random bytes, in that order in the blob.
func dirsLayer(t *testing.T, o Options) (*Layer, *testBlob, map[string][]byte) {
	t.Helper()
	files := map[string][]byte{}
	entries := []tarEntry{
		{hdr: tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{hdr: tar.Header{Name: "d/big", Typeflag: tar.TypeReg, Mode: 0o644}, body: randomBytes(1, 512<<10)},
	}
	files["d/big"] = entries[1].body
	add := func(dir string, n int) {
		for i := range n {
			name := fmt.Sprintf("%s/f%03d", dir, i)
			files[name] = randomBytes(int64(len(files)+10), 10<<10)
			entries = append(entries, tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644}, body: files[name]})
		}
	}
	add("d", 30)
	entries = append(entries, tarEntry{hdr: tar.Header{Name: "e/", Typeflag: tar.TypeDir, Mode: 0o755}})
	add("e", 10)
	data, desc := blobOf(t, entries)
	blob := &testBlob{data: data}
	return openLayer(t, data, blob, desc, o), blob, files
}

func readBack(t *testing.T, mnt string, files map[string][]byte, name string) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(mnt, name))
	if err != nil || !bytes.Equal(got, files[name]) {
		t.Fatalf("%s: read %d bytes (%v), want its %d", name, len(got), err, len(files[name]))
	}
}

// TestDirectoryReadAhead: once reads miss dirAheadMisses files of a
// directory, the directory's other small files are fetched in the
// background, and then read without a request; larger files and other
// directories are not.
func TestDirectoryReadAhead(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	// Requests of at most 16 KiB: a read brings at most its file's next
	// neighbour along, whatever the link's estimate.
	l, blob, files := dirsLayer(t, Options{MinRequest: 16 << 10, MaxRequest: 16 << 10})
	mnt := mountLayer(t, l)
	for i := range dirAheadMisses {
		if got := l.dirsAhead.Load(); got != 0 {
			t.Fatalf("%d files of d read: %d directories read ahead, want 0", i, got)
		}
		readBack(t, mnt, files, fmt.Sprintf("d/f%03d", 5*i))
	}
	if got := l.dirsAhead.Load(); got != 1 {
		t.Fatalf("%d files of d read: %d directories read ahead, want 1", dirAheadMisses, got)
	}
	cached := func(name string) bool { return l.f.cachedFile(chunksOf(t, l, name)) }
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; i < 30; i++ {
		name := fmt.Sprintf("d/f%03d", i)
		for !cached(name) {
			if time.Now().After(deadline) {
				t.Fatalf("%s not cached 30 s after d was queued for read-ahead", name)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	before := blob.requests.Load()
	for i := 0; i < 30; i++ {
		readBack(t, mnt, files, fmt.Sprintf("d/f%03d", i))
	}
	if got := blob.requests.Load() - before; got != 0 {
		t.Errorf("reads of d's small files after its read-ahead made %d requests, want 0", got)
	}
	if cached("d/big") {
		t.Error("d/big (512 KiB) was read ahead: larger files are left to their reads")
	}
	if cached("e/f005") {
		t.Error("e/f005 was read ahead: only d was read from")
	}
}

// TestNoDirectoryReadAheadWhenExact: a layer told to fetch only what reads
// need (MinRequest < 0) reads no directory ahead.
func TestNoDirectoryReadAheadWhenExact(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	l, blob, files := dirsLayer(t, Options{MinRequest: -1})
	mnt := mountLayer(t, l)
	for i := range dirAheadMisses + 1 {
		readBack(t, mnt, files, fmt.Sprintf("d/f%03d", 5*i))
	}
	if got := l.dirsAhead.Load(); got != 0 {
		t.Errorf("%d directories read ahead, want 0", got)
	}
	before := blob.requests.Load()
	readBack(t, mnt, files, "d/f021")
	if blob.requests.Load() == before {
		t.Error("d/f021 was read without a request: something read it ahead")
	}
}

// TestReadDoesNotWaitForOthersFetches: a read brings its file's neighbours
// in the blob along, but not those another load is fetching (a directory
// read-ahead, say): it returns once its own bytes are here, not when that
// load's request ends.
func TestReadDoesNotWaitForOthersFetches(t *testing.T) {
	// Requests of up to 64 KiB: a read of d/f010 (10 KiB) brings d/f011
	// and the next few along.
	l, blob, files := dirsLayer(t, Options{MinRequest: 64 << 10, MaxRequest: 64 << 10})
	next := chunksOf(t, l, "d/f011")
	hold := &blobHold{from: next[0].offset, to: next[len(next)-1].end, release: make(chan struct{})}
	blob.hold.Store(hold)
	released := false
	release := func() {
		if !released {
			released = true
			close(hold.release)
		}
	}
	t.Cleanup(release)

	// Another load fetches d/f011: its request waits until released.
	other := make(chan error, 1)
	go func() {
		_, err := l.f.load(context.Background(), next)
		other <- err
	}()
	for !l.f.cache.Fetching(next[0].dgst()) {
		select {
		case err := <-other:
			t.Fatalf("the other load returned before its request was released: %v", err)
		case <-time.After(time.Millisecond):
		}
	}

	own := chunksOf(t, l, "d/f010")
	want := files["d/f010"]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := make([]byte, len(want))
	n, err := l.f.readAt(ctx, own, int64(len(want)), p, 0, 0)
	if err != nil || !bytes.Equal(p[:n], want) {
		t.Fatalf("read of d/f010 while d/f011 is being fetched: %d bytes, %v", n, err)
	}
	select {
	case err := <-other:
		t.Fatalf("the other load returned before its request was released: %v", err)
	default:
	}
	release()
	if err := <-other; err != nil {
		t.Fatalf("the other load: %v", err)
	}
}

// TestReadDoesNotWaitForItsWholeRequest: a read returns once its own
// chunks have arrived, while what it brings along in the same request is
// still on its way; that arrives into the cache after, and Close stops
// such a request.
func TestReadDoesNotWaitForItsWholeRequest(t *testing.T) {
	// Requests of 64 KiB: a read of d/f010 (10 KiB) brings d/f011 and
	// the next few along.
	l, blob, files := dirsLayer(t, Options{MinRequest: 64 << 10, MaxRequest: 64 << 10})
	own, next := chunksOf(t, l, "d/f010"), chunksOf(t, l, "d/f011")
	if next[0].offset < own[len(own)-1].end {
		t.Fatalf("d/f011 at blob offset %d is not past d/f010", next[0].offset)
	}
	read := func(name string, own []chunk) {
		t.Helper()
		want := files[name]
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		p := make([]byte, len(want))
		n, err := l.f.readAt(ctx, own, int64(len(want)), p, 0, 0)
		if err != nil || !bytes.Equal(p[:n], want) {
			t.Fatalf("read of %s while its request stalls past it: %d bytes, %v", name, n, err)
		}
	}
	fetched := func() bool {
		for _, c := range next {
			if !l.f.cache.Has(c.dgst()) {
				return false
			}
		}
		return true
	}

	hold := &blobHold{from: next[0].offset, release: make(chan struct{})}
	blob.stall.Store(hold)
	read("d/f010", own)
	if fetched() || !l.f.cache.Fetching(next[0].dgst()) {
		t.Fatalf("d/f011 is cached (%v) or not being fetched: the read did not bring it along", fetched())
	}
	close(hold.release)
	for !fetched() {
		time.Sleep(time.Millisecond) // the test's deadline bounds this
	}
	if got := blob.requests.Load(); got != 1 {
		t.Errorf("%d requests, want the read's one", got)
	}

	// Again for the next file, and the layer closed while the request
	// stalls: Close stops it.
	own, next = chunksOf(t, l, "d/f020"), chunksOf(t, l, "d/f021")
	hold = &blobHold{from: next[0].offset, release: make(chan struct{})}
	defer close(hold.release)
	blob.stall.Store(hold)
	read("d/f020", own)
	if !l.f.cache.Fetching(next[0].dgst()) {
		t.Fatal("d/f021 is not being fetched: the read did not bring it along")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if l.f.cache.Fetching(next[0].dgst()) || fetched() {
		t.Errorf("after Close, d/f021 is still being fetched (%v) or was fetched (%v)", l.f.cache.Fetching(next[0].dgst()), fetched())
	}
}

// TestReadAfterCloseFails: a read of a closed layer whose request would
// outlive it fails at once, naming why, rather than retrying until the read
// timeout.
func TestReadAfterCloseFails(t *testing.T) {
	l, _, files := dirsLayer(t, Options{MinRequest: 64 << 10, MaxRequest: 64 << 10})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	own := chunksOf(t, l, "d/f005")
	p := make([]byte, len(files["d/f005"]))
	start := time.Now()
	_, err := l.f.readAt(context.Background(), own, int64(len(p)), p, 0, 0)
	if !errors.Is(err, errClosing) {
		t.Fatalf("read after Close: %v, want %v", err, errClosing)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("read after Close took %v: it retried", d)
	}
}
