package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// named returns a chunk of n bytes that starts with name, and its digest.
func named(name string, n int) (digest.Digest, []byte) {
	b := bytes.Repeat([]byte{'-'}, n)
	copy(b, name)
	return digest.FromBytes(b), b
}

// random returns a chunk of n pseudo-random bytes and its digest.
func random(seed uint64, n int) (digest.Digest, []byte) {
	r := rand.New(rand.NewPCG(seed, 0))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return digest.FromBytes(b), b
}

// openStore opens a store in dir and closes it when the test ends.
func openStore(t testing.TB, dir string, maxBytes int64) *Store {
	t.Helper()
	s, err := Open(t.Context(), dir, maxBytes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func mustPut(t testing.TB, s *Store, d digest.Digest, b []byte) {
	t.Helper()
	if err := s.Put(d, b); err != nil {
		t.Fatalf("Put(%s): %v", d, err)
	}
}

func mustKey(t testing.TB, d digest.Digest) key {
	t.Helper()
	k, err := parseKey(d)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// checkGet checks that Get returns b for d, or a miss if b is nil.
func checkGet(t testing.TB, s *Store, d digest.Digest, want []byte) {
	t.Helper()
	got, ok, err := s.Get(d)
	switch {
	case err != nil:
		t.Errorf("Get(%s): %v", d, err)
	case want == nil && ok:
		t.Errorf("Get(%s) = %d bytes, want a miss", d, len(got))
	case want != nil && !ok:
		t.Errorf("Get(%s) missed, want %d bytes", d, len(want))
	case want != nil && !bytes.Equal(got, want):
		t.Errorf("Get(%s) returned other bytes", d)
	}
	if has := s.Has(d); has != (want != nil) {
		t.Errorf("Has(%s) = %v, want %v", d, has, want != nil)
	}
}

// checkDisk checks that the chunk files in the store's directory are exactly
// the indexed chunks, each holding the bytes of its digest, and that nothing
// is left in staging.
func checkDisk(t testing.TB, s *Store) {
	t.Helper()
	var files int
	var size int64
	err := filepath.WalkDir(filepath.Join(s.dir, chunksDir), func(path string, e os.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		d := digest.Digest("sha256:" + e.Name())
		if digest.FromBytes(b) != d {
			t.Errorf("%s does not hold its chunk", path)
		}
		if !s.Has(d) {
			t.Errorf("%s is not indexed", path)
		}
		files++
		size += int64(len(b))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	if st.Chunks != files || st.Bytes != size {
		t.Errorf("Stats: %d chunks, %d bytes; on disk: %d chunks, %d bytes", st.Chunks, st.Bytes, files, size)
	}
	if st.MaxBytes > 0 && st.Bytes > st.MaxBytes {
		t.Errorf("Stats: %d bytes, over the bound of %d", st.Bytes, st.MaxBytes)
	}
	staged, err := os.ReadDir(filepath.Join(s.dir, stagingDir))
	if err != nil {
		t.Fatal(err)
	}
	if len(staged) != 0 {
		t.Errorf("%d files left in staging", len(staged))
	}
}

func TestPutGetHasDelete(t *testing.T) {
	s := openStore(t, t.TempDir(), 0)
	type chunk struct {
		d digest.Digest
		b []byte
	}
	var chunks []chunk
	for i, n := range []int{0, 1, 100, 64 << 10, 1 << 20} {
		d, b := random(uint64(i), n)
		chunks = append(chunks, chunk{d, b})
	}
	for _, c := range chunks {
		checkGet(t, s, c.d, nil)
		mustPut(t, s, c.d, c.b)
		mustPut(t, s, c.d, c.b) // again: no change
		checkGet(t, s, c.d, c.b)
	}
	checkDisk(t, s)
	if st := s.Stats(); st.Chunks != len(chunks) || st.Hits != int64(len(chunks)) || st.Misses != int64(len(chunks)) {
		t.Errorf("Stats = %+v, want %d chunks, hits and misses", st, len(chunks))
	}

	absent, _ := named("absent", 10)
	if err := s.Delete(chunks[1].d, chunks[3].d, absent); err != nil {
		t.Fatal(err)
	}
	for i, c := range chunks {
		want := c.b
		if i == 1 || i == 3 {
			want = nil
		}
		checkGet(t, s, c.d, want)
	}
	checkDisk(t, s)
}

func TestPutWrongBytes(t *testing.T) {
	s := openStore(t, t.TempDir(), 0)
	d, b := named("chunk", 100)
	_, other := named("other", 100)
	tests := []struct {
		name string
		b    []byte
	}{
		{"other bytes", other},
		{"short", b[:99]},
		{"long", append(b[:len(b):len(b)], 0)},
		{"empty", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.Put(d, tt.b)
			if !errors.Is(err, ErrDigestMismatch) || !strings.Contains(err.Error(), d.String()) {
				t.Errorf("Put: %v, want ErrDigestMismatch naming %s", err, d)
			}
			checkGet(t, s, d, nil)
		})
	}
	checkDisk(t, s)
	// The same Put, with the right bytes, after a chunk is stored.
	mustPut(t, s, d, b)
	if err := s.Put(d, other); !errors.Is(err, ErrDigestMismatch) {
		t.Errorf("Put over a stored chunk: %v, want ErrDigestMismatch", err)
	}
	checkGet(t, s, d, b)
}

func TestMalformedDigests(t *testing.T) {
	_, b := named("x", 10)
	tests := []struct {
		name string
		d    digest.Digest
		want error
	}{
		{"empty", "", digest.ErrDigestInvalidFormat},
		{"no algorithm", digest.Digest(strings.Repeat("a", 64)), digest.ErrDigestInvalidFormat},
		{"short", "sha256:abcd", digest.ErrDigestInvalidLength},
		{"upper case", digest.Digest("sha256:" + strings.ToUpper(digest.FromBytes(b).Encoded())), digest.ErrDigestInvalidFormat},
		{"path", digest.Digest("sha256:" + strings.Repeat("../", 20) + "tmp/"), digest.ErrDigestInvalidFormat},
		{"sha512", digest.Digest("sha512:" + strings.Repeat("ab", 64)), digest.ErrDigestUnsupported},
		{"unknown algorithm", digest.Digest("md5:" + strings.Repeat("ab", 16)), digest.ErrDigestUnsupported},
	}
	s := openStore(t, t.TempDir(), 0)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := s.Put(tt.d, b); !errors.Is(err, tt.want) {
				t.Errorf("Put: %v, want %v", err, tt.want)
			}
			if _, _, err := s.Get(tt.d); !errors.Is(err, tt.want) {
				t.Errorf("Get: %v, want %v", err, tt.want)
			}
			if s.Has(tt.d) {
				t.Error("Has: true")
			}
			if err := s.Delete(tt.d); !errors.Is(err, tt.want) {
				t.Errorf("Delete: %v, want %v", err, tt.want)
			}
			if _, err := s.Load(t.Context(), []digest.Digest{tt.d}, noFetch(t)); !errors.Is(err, tt.want) {
				t.Errorf("Load: %v, want %v", err, tt.want)
			}
		})
	}
	checkDisk(t, s)
	if st := s.Stats(); st.Chunks != 0 {
		t.Errorf("%d chunks stored", st.Chunks)
	}
}

// TestDamagedChunk checks that a chunk file changed behind the store's back
// reads as a miss, is removed, and can be stored again.
func TestDamagedChunk(t *testing.T) {
	tests := []struct {
		name   string
		damage func(path string) error
	}{
		{"cut short", func(path string) error { return os.Truncate(path, 50) }},
		{"emptied", func(path string) error { return os.Truncate(path, 0) }},
		{"longer", func(path string) error { return os.Truncate(path, 101) }},
		{"removed", os.Remove},
		{"replaced by a directory", func(path string) error {
			if err := os.Remove(path); err != nil {
				return err
			}
			return os.Mkdir(path, 0o700)
		}},
	}
	for _, tt := range tests {
		for _, via := range []string{"Get", "Load", "ReadAt"} {
			t.Run(tt.name+"/"+via, func(t *testing.T) {
				s := openStore(t, t.TempDir(), 0)
				d, b := named("chunk", 100)
				mustPut(t, s, d, b)
				if err := tt.damage(s.chunkPath(mustKey(t, d))); err != nil {
					t.Fatal(err)
				}
				fetches := 0
				fetch := func(context.Context, []digest.Digest, Deliver) (map[digest.Digest][]byte, error) {
					fetches++
					return map[digest.Digest][]byte{d: b}, nil
				}
				switch via {
				case "Get":
					checkGet(t, s, d, nil)
					checkDisk(t, s)
					mustPut(t, s, d, b)
				case "ReadAt":
					if ok, err := s.ReadAt(d, 100, make([]byte, 10), 40); ok || err != nil {
						t.Errorf("ReadAt = %v, %v; want a miss", ok, err)
					}
					checkDisk(t, s)
					mustPut(t, s, d, b)
				case "Load":
					got, err := s.Load(t.Context(), []digest.Digest{d}, fetch)
					if err != nil || !bytes.Equal(got[0], b) || fetches != 1 {
						t.Errorf("Load: %v, right bytes: %v, %d fetches", err, err == nil && bytes.Equal(got[0], b), fetches)
					}
				}
				checkGet(t, s, d, b)
				checkDisk(t, s)
			})
		}
	}
}

// TestEviction checks which chunks a bounded store keeps.
func TestEviction(t *testing.T) {
	chunk := func(name string) (digest.Digest, []byte) {
		if name == "B" {
			return named(name, 20)
		}
		return named(name, 10)
	}
	tests := []struct {
		name      string
		max       int64
		ops       string // put, get, has, load or delete a chunk: "+a =a ?a <a -a"; chunk B has 20 bytes, the others 10
		want      string // the chunks held at the end
		evictions int64
	}{
		{"fits", 30, "+a +b +c", "a b c", 0},
		{"least recently put goes first", 30, "+a +b +c +d", "b c d", 1},
		{"unbounded", 0, "+a +b +c +d +e", "a b c d e", 0},
		{"get is a use", 30, "+a +b +c =a +d", "a c d", 1},
		{"load is a use", 30, "+a +b +c <a +d", "a c d", 1},
		{"put of a held chunk is a use", 30, "+a +b +c +a +d", "a c d", 1},
		{"has is not a use", 30, "+a +b +c ?a +d", "b c d", 1},
		{"a miss is not a use", 30, "+a +b +c =x +d", "b c d", 1},
		{"a big chunk evicts several", 30, "+a +b +c +B", "c B", 2},
		{"oversized chunk not stored", 15, "+a +B", "a", 0},
		{"delete makes room", 30, "+a +b +c -b +d", "a c d", 0},
		{"room for one chunk", 10, "+a +b +c =a +d", "d", 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, t.TempDir(), tt.max)
			for _, op := range strings.Fields(tt.ops) {
				d, b := chunk(op[1:])
				var err error
				switch op[0] {
				case '+':
					err = s.Put(d, b)
				case '=':
					_, _, err = s.Get(d)
				case '?':
					s.Has(d)
				case '<':
					_, err = s.Load(t.Context(), []digest.Digest{d}, noFetch(t))
				case '-':
					err = s.Delete(d)
				}
				if err != nil {
					t.Fatalf("%s: %v", op, err)
				}
				if st := s.Stats(); tt.max > 0 && st.Bytes > tt.max {
					t.Fatalf("after %s: %d bytes, over the bound", op, st.Bytes)
				}
			}
			var held []string
			for _, name := range strings.Fields("a b c d e x B") {
				if d, _ := chunk(name); s.Has(d) {
					held = append(held, name)
				}
			}
			if got := strings.Join(held, " "); got != tt.want {
				t.Errorf("held %q, want %q", got, tt.want)
			}
			if got := s.Stats().Evictions; got != tt.evictions {
				t.Errorf("%d evictions, want %d", got, tt.evictions)
			}
			checkDisk(t, s)
		})
	}
}

func TestClosed(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, 0)
	d, b := named("chunk", 10)
	mustPut(t, s, d, b)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, _, err := s.Get(d); !errors.Is(err, ErrClosed) {
		t.Errorf("Get: %v, want ErrClosed", err)
	}
	if err := s.Put(d, b); !errors.Is(err, ErrClosed) {
		t.Errorf("Put: %v, want ErrClosed", err)
	}
	if err := s.Delete(d); !errors.Is(err, ErrClosed) {
		t.Errorf("Delete: %v, want ErrClosed", err)
	}
	if _, err := s.Load(t.Context(), []digest.Digest{d}, noFetch(t)); !errors.Is(err, ErrClosed) {
		t.Errorf("Load: %v, want ErrClosed", err)
	}
	if s.Has(d) {
		t.Error("Has: true")
	}
	if st := s.Stats(); st.Chunks != 1 {
		t.Errorf("Stats = %+v", st)
	}
	s = openStore(t, dir, 0) // the directory is free again
	checkGet(t, s, d, b)
}

// TestReadAt checks that ReadAt returns the bytes of any range of a stored
// chunk, and misses when the chunk is not held with the size asked for.
func TestReadAt(t *testing.T) {
	s := openStore(t, t.TempDir(), 0)
	d, b := random(7, 1000)
	mustPut(t, s, d, b)
	for _, r := range []struct{ off, n int64 }{{0, 1000}, {0, 1}, {999, 1}, {300, 400}, {1000, 0}} {
		p := make([]byte, r.n)
		ok, err := s.ReadAt(d, 1000, p, r.off)
		if !ok || err != nil || !bytes.Equal(p, b[r.off:r.off+r.n]) {
			t.Errorf("ReadAt(off %d, %d bytes) = %v, %v, right bytes: %v", r.off, r.n, ok, err, bytes.Equal(p, b[r.off:r.off+r.n]))
		}
	}
	for _, r := range []struct{ size, off, n int64 }{{999, 0, 10}, {1001, 0, 10}, {1000, 995, 10}, {1000, -1, 1}} {
		if ok, err := s.ReadAt(d, r.size, make([]byte, r.n), r.off); ok || err != nil {
			t.Errorf("ReadAt(size %d, off %d, %d bytes) = %v, %v; want a miss", r.size, r.off, r.n, ok, err)
		}
	}
	other, _ := random(8, 1000)
	if ok, err := s.ReadAt(other, 1000, make([]byte, 10), 0); ok || err != nil {
		t.Errorf("ReadAt of a chunk never stored = %v, %v; want a miss", ok, err)
	}
	// A range outside the chunk is not a lookup: no miss.
	if st := s.Stats(); st.Hits != 5 || st.Misses != 3 || st.Chunks != 1 {
		t.Errorf("Stats = %+v, want 5 hits, 3 misses, 1 chunk", st)
	}
	checkGet(t, s, d, b)
}

func BenchmarkGetHit(b *testing.B) {
	for _, size := range []int{64 << 10, 1 << 20, 4 << 20} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			s := openStore(b, b.TempDir(), 0)
			d, c := random(1, size)
			mustPut(b, s, d, c)
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, ok, err := s.Get(d); !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
		})
	}
}

// BenchmarkReadAtHit reads 128 KiB, what the kernel asks of a FUSE file at
// once, of a stored chunk, with Get and with ReadAt.
func BenchmarkReadAtHit(b *testing.B) {
	for _, size := range []int{1 << 20, 4 << 20} {
		s := openStore(b, b.TempDir(), 0)
		d, c := random(1, size)
		mustPut(b, s, d, c)
		p := make([]byte, 128<<10)
		b.Run(fmt.Sprintf("%dKiB/Get", size>>10), func(b *testing.B) {
			b.SetBytes(int64(len(p)))
			for b.Loop() {
				got, ok, err := s.Get(d)
				if !ok || err != nil {
					b.Fatal(ok, err)
				}
				copy(p, got[size/2:])
			}
		})
		b.Run(fmt.Sprintf("%dKiB/ReadAt", size>>10), func(b *testing.B) {
			b.SetBytes(int64(len(p)))
			for b.Loop() {
				if ok, err := s.ReadAt(d, int64(size), p, int64(size/2)); !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
		})
	}
}

func BenchmarkGetHitParallel(b *testing.B) {
	s := openStore(b, b.TempDir(), 0)
	var ds []digest.Digest
	for i := range 64 {
		d, c := random(uint64(i), 64<<10)
		mustPut(b, s, d, c)
		ds = append(ds, d)
	}
	b.SetBytes(64 << 10)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, ok, err := s.Get(ds[i%len(ds)]); !ok || err != nil {
				b.Fatal(ok, err)
			}
			i++
		}
	})
}
