package lazy

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/lazylayer/lazylayer/cache"
)

// TestReadCachedRanges: once a file's chunks are cached, reads of any range
// of it (within a chunk, across chunks, to the end) return its bytes
// without asking the registry; a cached chunk file damaged behind the
// cache's back is not served, and the read still returns the right bytes.
func TestReadCachedRanges(t *testing.T) {
	data, desc, files := buildLayer(t)
	blob := &testBlob{data: data}
	dir := t.TempDir()
	c, err := cache.Open(context.Background(), dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	l := openLayer(t, data, blob, desc, Options{Cache: c})
	t.Cleanup(func() { l.Close() })
	want := files["data/big"]
	all := make([]byte, len(want))
	if n, err := readFile(context.Background(), l, "data/big", all, 0); err != nil || !bytes.Equal(all[:n], want) {
		t.Fatalf("first read of data/big: %d bytes, %v", n, err)
	}
	cs := chunksOf(t, l, "data/big")
	if len(cs) < 3 {
		t.Fatalf("data/big has %d chunks: the test proves nothing", len(cs))
	}
	requests := blob.requests.Load()
	hits := c.Stats().Hits
	csz := cs[0].size
	ranges := []struct{ off, n int64 }{
		{0, 128 << 10},                     // the start of the first chunk
		{csz / 2, 100},                     // inside a chunk
		{csz - 10, 20},                     // across two chunks
		{csz - 1, csz + 2},                 // across three chunks
		{int64(len(want)) - 50, 50},        // the end
		{int64(len(want)) - 50, 128 << 10}, // past the end: cut short
		{0, int64(len(want))},              // all of it
	}
	check := func(when string) {
		t.Helper()
		for _, r := range ranges {
			p := make([]byte, r.n)
			n, err := readFile(context.Background(), l, "data/big", p, r.off)
			wantN := min(r.n, int64(len(want))-r.off)
			if err != nil || int64(n) != wantN || !bytes.Equal(p[:n], want[r.off:r.off+wantN]) {
				t.Errorf("%s: read of %d bytes at %d: %d bytes, %v, right bytes: %v", when, r.n, r.off, n, err, bytes.Equal(p[:n], want[r.off:r.off+int64(n)]))
			}
		}
	}
	check("cached")
	if got := blob.requests.Load(); got != requests {
		t.Errorf("reads of cached chunks made %d requests", got-requests)
	}
	if c.Stats().Hits == hits {
		t.Error("reads of cached chunks did not count as cache hits")
	}

	// The second chunk's file is cut short behind the cache's back.
	h := cs[1].dgst().Encoded()
	if err := os.Truncate(filepath.Join(dir, "sha256", h[:2], h), 10); err != nil {
		t.Fatal(err)
	}
	check("after damage")
	if !c.Has(cs[1].dgst()) {
		t.Error("the damaged chunk is not cached again")
	}
}
