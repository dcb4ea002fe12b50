package lazy

import (
	"context"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/cache"
)

// TestHeldAfterRestart: Progress().Held of a layer opened again from its
// saved TOC, as after a daemon restart, counts the bytes its blob copy
// held before, whether the daemon stopped cleanly (Close) or died.
func TestHeldAfterRestart(t *testing.T) {
	for _, tc := range []struct {
		name     string
		populate bool // fill the blob copy by population (held back half-way) rather than by reads
		crash    bool // reopen without closing the layer first
	}{
		{"reads/stop", false, false},
		{"reads/crash", false, true},
		{"population/crash", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data, desc, files := buildLayer(t)
			blob := &testBlob{data: data}
			c, err := cache.Open(context.Background(), t.TempDir(), 0)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			o := Options{Cache: c, BlobPath: filepath.Join(t.TempDir(), "blob")}
			l := openLayer(t, data, blob, desc, o)
			t.Cleanup(func() { l.Close() })
			if tc.populate {
				hold := &blobHold{from: 2 << 20, release: make(chan struct{})}
				blob.hold.Store(hold)
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() { done <- l.Populate(ctx, t.TempDir(), PopulateOptions{RangeSize: 256 << 10}) }()
				t.Cleanup(func() {
					cancel()
					close(hold.release)
					<-done
				})
				deadline := time.Now().Add(10 * time.Second)
				for l.Progress().Held < 2<<20 {
					if time.Now().After(deadline) {
						t.Fatalf("population held %d bytes after 10s", l.Progress().Held)
					}
					time.Sleep(10 * time.Millisecond)
				}
			} else {
				for name, want := range files {
					if _, err := readFile(context.Background(), l, name, make([]byte, len(want)), 0); err != nil && err != io.EOF {
						t.Fatal(err)
					}
				}
			}
			held := l.Progress().Held
			path := filepath.Join(t.TempDir(), "toc")
			if err := l.SaveTOC(path); err != nil {
				t.Fatal(err)
			}
			if !tc.crash {
				if err := l.Close(); err != nil {
					t.Fatal(err)
				}
			}

			rec, err := LoadRecorded(path)
			if err != nil {
				t.Fatal(err)
			}
			tocDigest, _ := Capable(desc)
			l2, err := Open(context.Background(), rec, blob, desc, tocDigest, o)
			if err != nil {
				t.Fatal(err)
			}
			defer l2.Close()
			if got := l2.Progress().Held; got < held {
				t.Errorf("after the restart %d bytes held of %d, before it %d", got, desc.Size, held)
			}
		})
	}
}
