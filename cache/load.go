package cache

import (
	"context"
	"errors"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// FetchFunc fetches the chunks missing from a store, for Load. It returns the
// bytes of each chunk by digest; it may merge the chunks into as few requests
// as it likes. It may return the chunks it got together with an error for the
// rest. Load verifies every chunk it returns and keeps the slices, so fetch
// must not reuse them. fetch must return when ctx is done.
type FetchFunc func(ctx context.Context, missing []digest.Digest) (map[digest.Digest][]byte, error)

// call is a chunk that one Load is fetching and others may wait for. b and
// err are set before done is closed and never change after.
type call struct {
	done chan struct{}
	b    []byte
	err  error
}

// errAbandoned completes the calls of a Load that gave up before its fetch
// returned (its ctx was done): the Loads waiting for them try again.
var errAbandoned = errors.New("the fetching Load gave up")

// errNotReturned says fetch returned without error but without a chunk.
var errNotReturned = errors.New("fetch returned no bytes for it")

// errFetchPanicked completes the calls of a Load whose fetch panicked.
var errFetchPanicked = errors.New("fetch panicked")

// Load returns the bytes of every chunk in ds, in order; a digest may appear
// more than once. It is the read-through entry point with de-duplicated
// fetches:
//
//   - chunks in the store are read from it (and count as used);
//   - chunks that another Load is fetching are awaited, until ctx is done;
//   - the remaining chunks are claimed and handed to one call of fetch, and
//     what it returns is verified, stored (see Put), returned and handed to
//     the Loads waiting for it.
//
// If fetch fails for a chunk, or returns bytes that do not hash to its digest
// (an error wrapping ErrDigestMismatch), Load returns an error naming the
// chunk, and so does every Load waiting for it; nothing is stored for it, and
// the next Load of it fetches again. Bytes that fail verification are never
// returned. If a Load's ctx is done while it fetches, the Loads waiting for it
// fetch the chunks themselves; so a Load may call fetch more than once, but
// only ever for chunks that no other Load is fetching.
//
// Chunks larger than the store's bound are returned but not stored. If a
// verified chunk cannot be written (a full disk, say), Load still returns it,
// and the store keeps it in memory for a while (see Stats.MemoryChunks):
// while chunks cannot be written, the store keeps up to 64 MiB of them in
// memory, least recently used out first, tries the disk again every 30
// seconds, and logs once when this starts and once when it ends.
func (s *Store) Load(ctx context.Context, ds []digest.Digest, fetch FetchFunc) ([][]byte, error) {
	keys := make([]key, len(ds))
	for i, d := range ds {
		k, err := parseKey(d)
		if err != nil {
			return nil, fmt.Errorf("load chunks: %w", err)
		}
		keys[i] = k
	}
	l := loader{s: s, got: make(map[key][]byte, len(keys))}
	pending := make([]key, 0, len(keys))
	seen := make(map[key]struct{}, len(keys))
	for _, k := range keys {
		if _, ok := seen[k]; !ok {
			seen[k] = struct{}{}
			pending = append(pending, k)
		}
	}
	for len(pending) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("load chunks: %w", err)
		}
		if err := l.resolve(pending); err != nil {
			return nil, err
		}
		if err := l.fetch(ctx, fetch); err != nil {
			return nil, err
		}
		var err error
		if pending, err = l.await(ctx); err != nil {
			return nil, err
		}
	}
	out := make([][]byte, len(keys))
	for i, k := range keys {
		out[i] = l.got[k]
	}
	return out, nil
}

// loader is the state of one Load.
type loader struct {
	s      *Store
	got    map[key][]byte   // the bytes of the chunks loaded so far
	missed map[key]struct{} // chunks counted as misses; nil until the first
	claims []flight         // chunks this Load fetches
	waits  []flight         // chunks other Loads fetch
}

// flight is a chunk that a Load fetches, with the call it completes.
type flight struct {
	key  key
	call *call
}

// resolve reads the chunks of pending that are in the store, and sorts the
// others into claims and waits. A chunk whose file turns out to be stale is
// dropped from the store and resolved again.
func (l *loader) resolve(pending []key) error {
	type hit struct {
		key  key
		size int64
	}
	var hits []hit
	for len(pending) > 0 {
		hits = hits[:0]
		l.s.mu.Lock()
		if l.s.closed {
			l.s.mu.Unlock()
			l.release()
			return ErrClosed
		}
		for _, k := range pending {
			if size, ok := l.s.index.touch(k); ok {
				hits = append(hits, hit{k, size})
				continue
			}
			if b, ok := l.s.mem.get(k); ok {
				l.got[k] = b
				l.s.hits.Add(1)
				continue
			}
			l.miss(k)
			if c, ok := l.s.inflight[k]; ok {
				l.waits = append(l.waits, flight{k, c})
				continue
			}
			c := &call{done: make(chan struct{})}
			l.s.inflight[k] = c
			l.claims = append(l.claims, flight{k, c})
		}
		l.s.mu.Unlock()

		var stale []key
		for _, h := range hits {
			b, err := l.s.readChunk(h.key, h.size)
			if errors.Is(err, errStale) {
				stale = append(stale, h.key)
				if err = l.s.drop(h.key); err == nil {
					continue
				}
			}
			if err != nil {
				l.release()
				return fmt.Errorf("load chunks: %w", err)
			}
			l.got[h.key] = b
			l.s.hits.Add(1)
		}
		pending = stale
	}
	return nil
}

// miss counts chunk k as a miss, once per Load.
func (l *loader) miss(k key) {
	if _, ok := l.missed[k]; ok {
		return
	}
	if l.missed == nil {
		l.missed = make(map[key]struct{})
	}
	l.missed[k] = struct{}{}
	l.s.misses.Add(1)
}

// release gives up the chunks this Load claimed but has not fetched: the Loads
// waiting for them try again.
func (l *loader) release() {
	for _, c := range l.claims {
		l.s.complete(c, nil, errAbandoned)
	}
	l.claims = nil
}

// fetch fetches the claimed chunks with one call of fetch, verifies and
// stores what it returns, and completes every claim, also if fetch panics.
// It returns the error of the first chunk that failed.
func (l *loader) fetch(ctx context.Context, fetch FetchFunc) error {
	claims := l.claims
	l.claims = nil
	if len(claims) == 0 {
		return nil
	}
	missing := make([]digest.Digest, len(claims))
	for i, c := range claims {
		missing[i] = c.key.digest()
	}
	completed := 0
	defer func() {
		for _, c := range claims[completed:] { // fetch panicked
			l.s.complete(c, nil, errFetchPanicked)
		}
	}()
	got, ferr := fetch(ctx, missing)
	abandoned := ferr != nil && ctx.Err() != nil

	var first error
	for i, c := range claims {
		b, ok := got[missing[i]]
		var err, shared error
		switch {
		case ok:
			if err = verify(c.key, b); err == nil {
				l.s.keep(ctx, c.key, b)
				l.got[c.key] = b
			}
			shared = err
		case ferr != nil:
			err = fmt.Errorf("fetch chunk %s: %w", c.key, ferr)
			shared = err
			if abandoned {
				shared = errAbandoned
			}
		default:
			err = fmt.Errorf("fetch chunk %s: %w", c.key, errNotReturned)
			shared = err
		}
		if err != nil {
			b = nil
		}
		l.s.complete(c, b, shared)
		completed++
		if first == nil {
			first = err
		}
	}
	return first
}

// complete ends a fetch of chunk c.key: it hands b or err to the Loads waiting
// for it. A chunk fetched successfully is in the store by then (unless it could
// not be stored), so a Load never finds it neither stored nor in flight.
func (s *Store) complete(c flight, b []byte, err error) {
	c.call.b, c.call.err = b, err
	s.mu.Lock()
	delete(s.inflight, c.key)
	s.mu.Unlock()
	close(c.call.done)
}

// await waits for the chunks other Loads fetch. It returns the chunks whose
// fetching Load gave up, for this Load to resolve again.
func (l *loader) await(ctx context.Context) (retry []key, err error) {
	waits := l.waits
	l.waits = nil
	for _, w := range waits {
		select {
		case <-w.call.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for chunk %s: %w", w.key, ctx.Err())
		}
		switch {
		case w.call.err == nil:
			l.got[w.key] = w.call.b
		case errors.Is(w.call.err, errAbandoned), errors.Is(w.call.err, errFetchPanicked):
			retry = append(retry, w.key)
		default:
			return nil, w.call.err
		}
	}
	return retry, nil
}
