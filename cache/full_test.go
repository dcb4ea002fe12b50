package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"
)

// tmpfs mounts a tmpfs of size bytes on a temporary directory until the
// test ends.
func tmpfs(t *testing.T, size int64) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d", size)); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// fill writes a file in dir until its filesystem is full, and returns the
// file's path.
func fill(t *testing.T, dir string) string {
	t.Helper()
	f, err := os.CreateTemp(dir, "filler-")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return f.Name()
		}
	}
}

// TestLoadOnFullDisk: when chunks cannot be written, Load keeps them in
// memory: each is fetched once, and the log says so once. Once the disk has
// room again, chunks are written again.
func TestLoadOnFullDisk(t *testing.T) {
	dir := tmpfs(t, 1<<20)
	s := openStore(t, filepath.Join(dir, "cache"), 0)
	filler := fill(t, dir)
	logger, logs := test.NewNullLogger()
	logger.SetLevel(logrus.DebugLevel)
	ctx := log.WithLogger(t.Context(), logrus.NewEntry(logger))

	src, ds := newSource(8, 64<<10)
	for range 3 {
		for _, d := range ds {
			got, err := s.Load(ctx, []digest.Digest{d}, src.fetch)
			if err != nil {
				t.Fatalf("Load on a full disk: %v", err)
			}
			src.checkLoaded(t, []digest.Digest{d}, got)
		}
	}
	_, fetched := src.counts()
	for _, d := range ds {
		if fetched[d] != 1 {
			t.Errorf("chunk %s fetched %d times, want 1", d, fetched[d])
		}
	}
	var warnings []string
	for _, e := range logs.AllEntries() {
		if e.Level <= logrus.WarnLevel {
			warnings = append(warnings, e.Message+": "+fmt.Sprint(e.Data[logrus.ErrorKey]))
		}
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "no space left on device") {
		t.Errorf("logged %d warnings, want one naming the full disk: %q", len(warnings), warnings)
	}
	st := s.Stats()
	if st.Chunks != 0 || st.MemoryChunks != len(ds) || st.MemoryBytes != int64(len(ds))*64<<10 {
		t.Errorf("stats %+v, want the %d chunks in memory", st, len(ds))
	}
	if !s.Has(ds[0]) {
		t.Error("Has is false for a chunk held in memory")
	}
	p := make([]byte, 100)
	if ok, err := s.ReadAt(ds[0], 64<<10, p, 1000); !ok || err != nil || !bytes.Equal(p, src.chunks[ds[0]][1000:1100]) {
		t.Errorf("ReadAt of a chunk held in memory = %v, %v, right bytes: %v", ok, err, bytes.Equal(p, src.chunks[ds[0]][1000:1100]))
	}

	// The disk has room again; once the store tries it again, it writes
	// chunks again.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.retryAt = s.retryAt.Add(-writeRetry)
	s.mu.Unlock()
	d, b := random(2000, 64<<10)
	more := &source{chunks: map[digest.Digest][]byte{d: b}, fetched: map[digest.Digest]int{}}
	if _, err := s.Load(ctx, []digest.Digest{d}, more.fetch); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Chunks != 1 || st.MemoryChunks != 0 || st.WriteError != nil {
		t.Errorf("after the disk has room again: %+v, want the new chunk on disk and none in memory", st)
	}
	if last := logs.LastEntry(); last == nil || last.Level != logrus.InfoLevel || !strings.Contains(last.Message, "again") {
		t.Errorf("the log does not say that chunks are written again: %v", last)
	}
	checkDisk(t, s)
}

// TestMemoryBound: memory mode holds chunks within its bound, the least
// recently used going first.
func TestMemoryBound(t *testing.T) {
	m := newMemory(100)
	var ks []key
	for i := range 3 {
		d, b := random(uint64(i), 40)
		k := mustKey(t, d)
		ks = append(ks, k)
		m.add(k, b)
		if i == 1 {
			m.get(ks[0]) // ks[1] is now the least recently used
		}
	}
	for i, want := range []bool{true, false, true} {
		if _, ok := m.get(ks[i]); ok != want {
			t.Errorf("chunk %d held: %v, want %v", i, ok, want)
		}
	}
	if m.order.bytes != 80 || len(m.data) != 2 {
		t.Errorf("%d bytes in %d chunks, want 80 in 2", m.order.bytes, len(m.data))
	}
	d, b := random(9, 101)
	if m.add(mustKey(t, d), b); len(m.data) != 2 {
		t.Error("a chunk larger than the bound was kept")
	}
}

// TestSetMemoryBound: the bound the daemon derives from its memory limit
// holds for the chunks kept in memory, and lowering it lets chunks go.
func TestSetMemoryBound(t *testing.T) {
	s, err := Open(context.Background(), t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := s.MemoryBound(); got != memoryBytes {
		t.Errorf("default bound %d, want %d", got, memoryBytes)
	}
	s.mu.Lock()
	for i := range 4 {
		d, b := random(uint64(i), 1000)
		s.mem.add(mustKey(t, d), b)
	}
	s.mu.Unlock()
	s.SetMemoryBound(2500)
	if st := s.Stats(); st.MemoryBytes > 2500 || st.MemoryChunks != 2 {
		t.Errorf("after SetMemoryBound(2500): %d chunks, %d bytes in memory, want 2 chunks within 2500 bytes", st.MemoryChunks, st.MemoryBytes)
	}
	s.mu.Lock()
	d, b := random(9, 3000)
	s.mem.add(mustKey(t, d), b)
	s.mu.Unlock()
	if st := s.Stats(); st.MemoryBytes > 2500 {
		t.Errorf("a chunk beyond the bound was kept: %d bytes in memory", st.MemoryBytes)
	}
}
