package cache

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// ErrDigestMismatch is wrapped by the errors of Put and Load when a chunk's
// bytes do not hash to its digest.
var ErrDigestMismatch = errors.New("chunk bytes do not match the digest")

// ErrClosed is returned by a Store's methods after Close.
var ErrClosed = errors.New("chunk store is closed")

// A Store is a directory of verified chunks with an in-memory index of them.
// It is safe for concurrent use. Byte slices it returns are shared with other
// callers (Load hands the bytes of one fetch to every Load waiting for them)
// and must not be modified.
type Store struct {
	dir      string
	maxBytes int64    // 0: unbounded
	lock     *os.File // holds the flock on dir/lock; closed by Close

	hits, misses, evictions atomic.Int64

	// mu guards the fields below. It is also held while a chunk file is
	// renamed into place or removed, so that the index and the files under
	// dir/sha256 change together: a chunk is indexed exactly when its file
	// is in place.
	mu       sync.Mutex
	index    *lru
	inflight map[key]*call // chunks that a Load is fetching
	closed   bool
	// Memory mode (see memory.go): the write failure that started it, nil
	// when not in memory mode; when to try writing again; the chunks held
	// in memory, and their bound.
	writeErr error
	retryAt  time.Time
	mem      *memory
	memMax   int64
}

// Stats describes a Store.
type Stats struct {
	Chunks    int   // chunks in the store
	Bytes     int64 // their total size
	MaxBytes  int64 // the bound given to Open; 0 means unbounded
	Hits      int64 // chunks that Get and Load found in the store
	Misses    int64 // chunks that Get and Load did not find in the store
	Evictions int64 // chunks removed to keep the store within its bound
	// MemoryChunks and MemoryBytes are the chunks held in memory because
	// they could not be written (see Load), and their total size.
	MemoryChunks int
	MemoryBytes  int64
	// WriteError is why chunks cannot be written, while they cannot.
	WriteError error
}

// Open opens or creates a store in dir, bounded to maxBytes of chunk data (0
// means unbounded). Staged files that a crash left behind are removed, and the
// chunks already in dir are indexed (their size, and their last use from the
// file's access or modification time) without reading their content; if they
// exceed maxBytes, the least recently used are evicted. If the machine
// restarted since the last Open without the store being closed, the chunks
// are discarded instead (see the package documentation). ctx bounds the scan
// of the directory.
//
// Only one Store can have dir open at a time, in this process or another.
func Open(ctx context.Context, dir string, maxBytes int64) (*Store, error) {
	s, err := open(ctx, dir, maxBytes)
	if err != nil {
		return nil, fmt.Errorf("open chunk store %s: %w", dir, err)
	}
	return s, nil
}

func open(ctx context.Context, dir string, maxBytes int64) (*Store, error) {
	if maxBytes < 0 {
		return nil, fmt.Errorf("negative size bound %d", maxBytes)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	s := &Store{dir: dir, maxBytes: maxBytes, lock: lock, inflight: make(map[key]*call), mem: newMemory(memoryBytes), memMax: memoryBytes}
	all, err := s.load(ctx)
	if err != nil {
		lock.Close()
		return nil, err
	}
	slices.SortFunc(all, func(a, b found) int { return cmp.Compare(a.lastUsed, b.lastUsed) })
	s.index = newLRU(len(all))
	for _, f := range all {
		s.index.add(f.key, f.size) // each add becomes the most recently used
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.makeRoomLocked(0); err != nil {
		lock.Close()
		return nil, err
	}
	return s, nil
}

// Close syncs the filesystem that holds the store, marks the store as closed
// cleanly (so the next Open trusts its chunks even after a reboot; see the
// package documentation) and releases the directory. Calls after Close fail
// with ErrClosed, except Has (false) and Stats. A Load that is fetching when
// Close is called still returns the bytes it fetched, without storing them.
// Close is idempotent.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mem = newMemory(s.memMax)
	s.mu.Unlock()
	err := s.endRun()
	if cerr := s.lock.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("close chunk store %s: %w", s.dir, err)
	}
	return nil
}

// load prepares the store's directory and lists the chunks in it, after
// discarding them if they cannot be trusted (see startRun).
func (s *Store) load(ctx context.Context) ([]found, error) {
	trusted, err := s.startRun()
	if err != nil {
		return nil, err
	}
	if !trusted {
		chunks := filepath.Join(s.dir, chunksDir)
		if ok, err := exists(chunks); err != nil {
			return nil, err
		} else if ok {
			log.G(ctx).WithField("dir", s.dir).Info("chunk cache: discarding chunks, which the machine may have lost in a crash")
			if err := os.RemoveAll(chunks); err != nil {
				return nil, err
			}
		}
	}
	if err := s.prepareDirs(); err != nil {
		return nil, err
	}
	return s.scan(ctx)
}

// Get returns the bytes of chunk d; ok is false if the store does not hold it,
// on disk or in memory (see Load). A hit counts as a use of the chunk for
// eviction. The bytes are not verified
// again (see the package documentation); a chunk file of the wrong size is
// removed and reported as a miss.
func (s *Store) Get(d digest.Digest) (b []byte, ok bool, err error) {
	k, err := parseKey(d)
	if err != nil {
		return nil, false, err
	}
	b, ok, err = s.get(k)
	switch {
	case ok:
		s.hits.Add(1)
	case err == nil:
		s.misses.Add(1)
	}
	return b, ok, err
}

func (s *Store) get(k key) ([]byte, bool, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, false, ErrClosed
	}
	size, ok := s.index.touch(k)
	if !ok {
		b, ok := s.mem.get(k)
		s.mu.Unlock()
		return b, ok, nil
	}
	s.mu.Unlock()
	b, err := s.readChunk(k, size)
	if errors.Is(err, errStale) {
		return nil, false, s.drop(k)
	}
	if err != nil {
		return nil, false, err
	}
	return b, true, nil
}

// drop removes a chunk whose file turned out to be stale.
func (s *Store) drop(k key) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.removeLocked(k)
}

// Put verifies that b hashes to d and stores it. Bytes that do not match give
// an error wrapping ErrDigestMismatch, and nothing is stored. Storing a chunk
// the store already holds counts as a use of it. A chunk larger than the
// store's bound is not stored, and Put returns nil: the store is a cache.
// To make room, Put evicts the least recently used chunks.
//
// Put writes the chunk to a new file in dir/staging and renames it into place,
// so a reader never sees part of a chunk. It does not sync the file; the
// package documentation says why that is safe.
func (s *Store) Put(d digest.Digest, b []byte) error {
	k, err := parseKey(d)
	if err != nil {
		return err
	}
	if err := verify(k, b); err != nil {
		return err
	}
	_, err = s.put(k, b)
	return err
}

// put stores b, which the caller verified, as chunk k. wrote reports
// whether it wrote a chunk file.
func (s *Store) put(k key, b []byte) (wrote bool, err error) {
	size := int64(len(b))
	if s.maxBytes > 0 && size > s.maxBytes {
		return false, nil
	}
	s.mu.Lock()
	closed := s.closed
	_, ok := s.index.touch(k)
	s.mu.Unlock()
	if closed {
		return false, ErrClosed
	}
	if ok {
		return false, nil
	}
	staged, err := s.stage(b)
	if err != nil {
		return false, fmt.Errorf("store chunk %s: %w", k, err)
	}
	s.mu.Lock()
	used, err := s.commitLocked(k, size, staged)
	if used {
		s.mem.remove(k)
	}
	s.mu.Unlock()
	if !used {
		_ = os.Remove(staged) // Open clears dir/staging if this fails too.
	}
	return used, err
}

// commitLocked renames a staged chunk file into place and indexes it. used
// reports whether the staged file was renamed.
func (s *Store) commitLocked(k key, size int64, staged string) (used bool, err error) {
	if s.closed {
		return false, ErrClosed
	}
	if _, ok := s.index.touch(k); ok { // another Put got there first
		return false, nil
	}
	if err := s.makeRoomLocked(size); err != nil {
		return false, fmt.Errorf("store chunk %s: %w", k, err)
	}
	if err := s.rename(staged, k); err != nil {
		return false, fmt.Errorf("store chunk %s: %w", k, err)
	}
	s.index.add(k, size)
	return true, nil
}

// makeRoomLocked evicts the least recently used chunks until need more bytes
// fit within the bound.
func (s *Store) makeRoomLocked(need int64) error {
	if s.maxBytes == 0 {
		return nil
	}
	for s.index.bytes+need > s.maxBytes {
		k, ok := s.index.oldest()
		if !ok {
			return nil
		}
		if err := s.removeLocked(k); err != nil {
			return fmt.Errorf("evict: %w", err)
		}
		s.evictions.Add(1)
	}
	return nil
}

// removeLocked removes chunk k's file and its index entry. A chunk that is not
// indexed is left alone. If the file cannot be removed, the entry stays.
func (s *Store) removeLocked(k key) error {
	if _, ok := s.index.lookup(k); !ok {
		return nil
	}
	if err := os.Remove(s.chunkPath(k)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove chunk %s: %w", k, err)
	}
	s.index.remove(k)
	return nil
}

// Has reports whether the store holds chunk d, on disk or in memory (see
// Load). It does not count as a use.
func (s *Store) Has(d digest.Digest) bool {
	k, err := parseKey(d)
	if err != nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if _, ok := s.index.lookup(k); ok {
		return true
	}
	_, ok := s.mem.data[k]
	return ok
}

// Fetching reports whether a Load is fetching chunk d now: a Load that
// asks for it waits until that fetch completes.
func (s *Store) Fetching(d digest.Digest) bool {
	k, err := parseKey(d)
	if err != nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.inflight[k]
	return ok
}

// Delete removes the chunks ds from the store; chunks it does not hold are
// ignored. If one digest is malformed, nothing is removed. A chunk that a Load
// is fetching is stored when the fetch completes, even if Delete ran meanwhile.
func (s *Store) Delete(ds ...digest.Digest) error {
	keys := make([]key, len(ds))
	for i, d := range ds {
		k, err := parseKey(d)
		if err != nil {
			return fmt.Errorf("delete chunks: %w", err)
		}
		keys[i] = k
	}
	for _, k := range keys {
		// One chunk per hold of mu, so readers are not kept waiting for
		// a whole layer's chunks.
		s.mu.Lock()
		err := ErrClosed
		if !s.closed {
			s.mem.remove(k)
			err = s.removeLocked(k)
		}
		s.mu.Unlock()
		if err != nil {
			return fmt.Errorf("delete chunks: %w", err)
		}
	}
	return nil
}

// Stats returns the store's size and counters.
func (s *Store) Stats() Stats {
	s.mu.Lock()
	st := Stats{Chunks: s.index.len(), Bytes: s.index.bytes, MaxBytes: s.maxBytes,
		MemoryChunks: s.mem.order.len(), MemoryBytes: s.mem.order.bytes, WriteError: s.writeErr}
	s.mu.Unlock()
	st.Hits = s.hits.Load()
	st.Misses = s.misses.Load()
	st.Evictions = s.evictions.Load()
	return st
}

// ReadAt reads len(p) bytes of chunk d, starting at byte off of the chunk,
// into p, without reading the rest of the chunk: a read of a few pages of a
// large cached chunk costs those pages. ok is false if the store does not
// hold chunk d with exactly size bytes, on disk or in memory (see Load), or
// if off and len(p) do not fit in size; then p is left undefined. A hit
// counts as a use of the chunk for eviction. As with Get, the bytes are not
// verified again (see the package documentation), and a chunk file of the
// wrong size is removed and reported as a miss.
func (s *Store) ReadAt(d digest.Digest, size int64, p []byte, off int64) (ok bool, err error) {
	k, err := parseKey(d)
	if err != nil {
		return false, err
	}
	if off < 0 || off > size || int64(len(p)) > size-off {
		return false, nil
	}
	ok, err = s.readAt(k, size, p, off)
	switch {
	case ok:
		s.hits.Add(1)
	case err == nil:
		s.misses.Add(1)
	}
	return ok, err
}

func (s *Store) readAt(k key, size int64, p []byte, off int64) (bool, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false, ErrClosed
	}
	indexed, ok := s.index.touch(k)
	if !ok {
		b, ok := s.mem.get(k)
		s.mu.Unlock()
		if !ok || int64(len(b)) != size {
			return false, nil
		}
		copy(p, b[off:])
		return true, nil
	}
	s.mu.Unlock()
	if indexed != size {
		return false, nil
	}
	err := s.readChunkAt(k, size, p, off)
	if errors.Is(err, errStale) {
		return false, s.drop(k)
	}
	if err != nil {
		return false, err
	}
	return true, nil
}
