package cache

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func TestReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(t.Context(), dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := map[digest.Digest][]byte{}
	for i := range 20 {
		d, b := random(uint64(i), 1000*i)
		mustPut(t, s, d, b)
		want[d] = b
	}
	if _, err := Open(t.Context(), dir, 0); err == nil {
		t.Fatal("a second Open of the same directory succeeded")
	}
	before := s.Stats()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir, 0)
	after := s.Stats()
	if after.Chunks != before.Chunks || after.Bytes != before.Bytes {
		t.Errorf("after reopening: %d chunks, %d bytes; before: %d, %d", after.Chunks, after.Bytes, before.Chunks, before.Bytes)
	}
	for d, b := range want {
		checkGet(t, s, d, b)
	}
	checkDisk(t, s)
}

func TestOpenRemovesStaged(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, 0)
	d, b := named("kept", 10)
	mustPut(t, s, d, b)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// What a crash in the middle of Put leaves, and files that are not chunks.
	staging := filepath.Join(dir, stagingDir)
	junk := filepath.Join(dir, chunksDir, "00", "not-a-chunk")
	for path, content := range map[string]string{
		filepath.Join(staging, "chunk-123"):     "half a chu",
		filepath.Join(staging, "sub", "deeper"): "x",
		junk:                                    "junk",
		filepath.Join(dir, chunksDir, "README"): "y",
	} {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	s = openStore(t, dir, 0)
	if entries, err := os.ReadDir(staging); err != nil || len(entries) != 0 {
		t.Errorf("staging after Open: %d entries, %v", len(entries), err)
	}
	if st := s.Stats(); st.Chunks != 1 || st.Bytes != int64(len(b)) {
		t.Errorf("Stats = %+v, want only the chunk", st)
	}
	if _, err := os.Stat(junk); err != nil {
		t.Errorf("a file that is not a chunk was touched: %v", err)
	}
	checkGet(t, s, d, b)
	d2, b2 := named("another", 10) // in a shard not made yet
	mustPut(t, s, d2, b2)
	checkGet(t, s, d2, b2)
}

func TestOpenAfterCrash(t *testing.T) {
	current, err := os.ReadFile(bootIDPath)
	if err != nil {
		t.Skipf("no boot ID: %v", err)
	}
	tests := []struct {
		name     string
		closed   bool // Close ran: the clean marker is there
		rebooted bool // the boot ID is another one
		kept     bool
	}{
		{"closed", true, false, true},
		{"closed, then rebooted", true, true, true},
		{"daemon died", false, false, true},
		{"machine crashed", false, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir, 0)
			d, b := named("chunk", 10)
			mustPut(t, s, d, b)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if !tt.closed {
				if err := os.Remove(filepath.Join(dir, cleanName)); err != nil {
					t.Fatal(err)
				}
			}
			if tt.rebooted {
				other := bytes.ToUpper(current) // not what /proc gives
				if err := os.WriteFile(filepath.Join(dir, bootIDName), other, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			s = openStore(t, dir, 0)
			want := b
			if !tt.kept {
				want = nil
			}
			checkGet(t, s, d, want)
			checkDisk(t, s)
			// Whatever happened before, this run is not closed yet.
			if _, err := os.Stat(filepath.Join(dir, cleanName)); err == nil {
				t.Error("the clean marker is there while the store is open")
			}
		})
	}
}

// TestOpenEvictsToBound reopens a store with a smaller bound: the chunks read
// least recently, by their file times, go.
func TestOpenEvictsToBound(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, 0)
	ages := map[string]time.Duration{"a": 2 * time.Hour, "b": 3 * time.Hour, "c": time.Hour, "d": 0}
	for name := range ages {
		d, b := named(name, 10)
		mustPut(t, s, d, b)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for name, age := range ages {
		d, _ := named(name, 10)
		if err := os.Chtimes(s.chunkPath(mustKey(t, d)), now.Add(-age), now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}

	s = openStore(t, dir, 25)
	for name, kept := range map[string]bool{"a": false, "b": false, "c": true, "d": true} {
		d, _ := named(name, 10)
		if s.Has(d) != kept {
			t.Errorf("chunk %s held: %v, want %v", name, !kept, kept)
		}
	}
	if st := s.Stats(); st.Evictions != 2 {
		t.Errorf("%d evictions, want 2", st.Evictions)
	}
	checkDisk(t, s)
}

func TestOpenRejects(t *testing.T) {
	if _, err := Open(t.Context(), t.TempDir(), -1); err == nil {
		t.Error("Open with a negative bound succeeded")
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(t.Context(), file, 0); err == nil {
		t.Error("Open of a file succeeded")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := Open(ctx, t.TempDir(), 0); !errors.Is(err, context.Canceled) {
		t.Errorf("Open with a canceled context: %v", err)
	}
}
