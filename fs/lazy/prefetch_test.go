package lazy

import (
	"archive/tar"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// TestPrefetchInPieces: the prioritized files arrive in pieces, in blob
// order: the first ones are cached while a request for later ones is
// still unanswered, not once the whole region has come.
func TestPrefetchInPieces(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	var entries []tarEntry
	var names []string
	for i := range 4 {
		name := fmt.Sprintf("p%d", i)
		names = append(names, name)
		// Incompressible, 700 KiB: a file a piece.
		entries = append(entries, tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644}, body: randomBytes(int64(i+1), 700<<10)})
	}
	data, desc := blobOf(t, entries, estargz.WithPrioritizedFiles(names))
	blob := &testBlob{data: data}
	l := openLayer(t, data, blob, desc, Options{})
	if l.ix.prefetchEnd <= 0 {
		t.Fatal("the layer has no prefetch landmark")
	}
	cached := func(name string) bool { return l.f.cachedFile(chunksOf(t, l, name)) }
	hold := &blobHold{from: chunksOf(t, l, "p2")[0].offset, release: make(chan struct{})}
	blob.hold.Store(hold)
	released := false
	release := func() {
		if !released {
			released = true
			close(hold.release)
		}
	}
	t.Cleanup(release)
	mountLayer(t, l)
	deadline := time.Now().Add(30 * time.Second)
	for !cached("p0") || !cached("p1") {
		if time.Now().After(deadline) {
			t.Fatal("p0 and p1 not cached while the request for p2 waits: the prefetch waits for its whole region")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if cached("p2") || cached("p3") {
		t.Fatal("p2 or p3 cached while their bytes were held")
	}
	release()
	for !cached("p2") || !cached("p3") {
		if time.Now().After(deadline) {
			t.Fatal("p2 and p3 not cached after their bytes were released")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := blob.requests.Load(); got != 4 {
		t.Errorf("the prefetch made %d requests, want 4 (a piece a 700 KiB file)", got)
	}
}
