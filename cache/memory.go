package cache

import (
	"context"
	"errors"
	"time"

	"github.com/containerd/log"
)

// When a fetched chunk cannot be written (a full disk, a quota, a read-only
// filesystem, ...), the store goes into memory mode: Load keeps the chunks
// it fetches in memory, up to a bound (memoryBytes unless SetMemoryBound
// says otherwise), least recently used out first,
// and serves them from there, so that a chunk is not fetched again on every
// read. The disk is not tried again for writeRetry; then the next chunk
// fetched is written, and if that works, memory mode ends and the chunks
// held in memory are let go (the kernel's page cache usually holds what is
// read often; the rest is fetched and stored again). The log says when
// memory mode starts and ends, not for every chunk.
const (
	memoryBytes = 64 << 20
	writeRetry  = 30 * time.Second
)

// memory holds chunks that could not be written, within a bound. It is not
// safe for concurrent use; Store.mu guards it.
type memory struct {
	order *lru // the chunks and their sizes, in order of use
	data  map[key][]byte
	max   int64
}

func newMemory(max int64) *memory {
	return &memory{order: newLRU(0), data: make(map[key][]byte), max: max}
}

// get returns chunk k and records a use of it.
func (m *memory) get(k key) ([]byte, bool) {
	if _, ok := m.order.touch(k); !ok {
		return nil, false
	}
	return m.data[k], true
}

// add keeps chunk k, letting the least recently used go to make room. A
// chunk larger than the bound is not kept.
func (m *memory) add(k key, b []byte) {
	size := int64(len(b))
	if size > m.max {
		return
	}
	if _, ok := m.order.touch(k); ok {
		return
	}
	for m.order.bytes+size > m.max {
		old, _ := m.order.oldest()
		m.remove(old)
	}
	m.order.add(k, size)
	m.data[k] = b
}

func (m *memory) remove(k key) {
	if _, ok := m.order.remove(k); ok {
		delete(m.data, k)
	}
}

// keep stores chunk k, fetched and verified by Load: on disk, or in memory
// while the store is in memory mode (see above). It logs when memory mode
// starts and ends.
func (s *Store) keep(ctx context.Context, k key, b []byte) {
	if s.maxBytes > 0 && int64(len(b)) > s.maxBytes {
		return // never stored: see Put
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	if s.writeErr != nil && time.Now().Before(s.retryAt) {
		s.mem.add(k, b)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()

	wrote, err := s.put(k, b)
	if errors.Is(err, ErrClosed) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	entry := log.G(ctx).WithField("dir", s.dir)
	switch {
	case err != nil:
		started := s.writeErr == nil
		s.writeErr, s.retryAt = err, time.Now().Add(writeRetry)
		s.mem.add(k, b)
		if started {
			entry.WithError(err).Warnf("chunk cache: cannot write chunks; keeping up to %d MiB of fetched chunks in memory, trying the disk again every %v",
				s.memMax>>20, writeRetry)
		} else {
			entry.WithError(err).Debug("chunk cache: still cannot write chunks")
		}
	case wrote && s.writeErr != nil:
		s.writeErr = nil
		s.mem = newMemory(s.memMax)
		entry.Info("chunk cache: writing chunks again")
	}
}

// SetMemoryBound bounds the chunks the store keeps in memory while it
// cannot write them (see Load) to n bytes, instead of 64 MiB: the daemon
// derives it from its memory limit. Chunks held beyond n are let go.
func (s *Store) SetMemoryBound(n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.memMax = max(n, 0)
	s.mem.max = s.memMax
	for s.mem.order.bytes > s.mem.max {
		old, _ := s.mem.order.oldest()
		s.mem.remove(old)
	}
}

// MemoryBound is the bound SetMemoryBound set.
func (s *Store) MemoryBound() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.memMax
}
