package cache

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/opencontainers/go-digest"
)

// FetchFunc fetches the chunks missing from a store, for Load. It returns the
// bytes of each chunk by digest; it may merge the chunks into as few requests
// as it likes. It may return the chunks it got together with an error for the
// rest. It may also hand each chunk to deliver as soon as it has its bytes,
// before it returns (from any goroutine, until it returns): Load then
// verifies and stores it and wakes the Loads waiting for it at once, instead
// of when the whole fetch is over; deliver returns the error of a chunk that
// fails verification (wrapping ErrDigestMismatch), for fetch to stop there.
// Load verifies every chunk it is given and keeps the slices, so fetch must
// not reuse them. fetch must return when ctx is done.
type FetchFunc func(ctx context.Context, missing []digest.Digest, deliver Deliver) (map[digest.Digest][]byte, error)

// Deliver hands a chunk's bytes to Load before its FetchFunc returns, and
// returns the error of bytes that do not hash to d.
type Deliver func(d digest.Digest, b []byte) error

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
	keys, pending, err := parseKeys(ds)
	if err != nil {
		return nil, err
	}
	l := loader{s: s, got: make(map[key][]byte, len(keys))}
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

// LoadFirst is Load for a caller that needs only the first n chunks of ds
// now and asks for the others to have them soon: a read that brings along
// what follows it in the blob, or the rest of its file. It returns once
// the first n are there, with their bytes (and those of any other chunk of
// ds that was at hand; nil for the rest), while the chunks it fetches go on
// arriving: its fetch runs under bg rather than ctx, after LoadFirst
// returned, and stores them and hands them to the Loads waiting for them
// as Load does. With fetch delivering chunks as they come (see FetchFunc),
// a read waits for its own chunks only, not for all of its request.
func (s *Store) LoadFirst(ctx, bg context.Context, ds []digest.Digest, n int, fetch FetchFunc) ([][]byte, error) {
	n = min(max(n, 0), len(ds))
	keys, pending, err := parseKeys(ds)
	if err != nil {
		return nil, err
	}
	l := loader{s: s, got: make(map[key][]byte, len(keys))}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("load chunks: %w", err)
	}
	if err := l.resolve(pending); err != nil {
		return nil, err
	}
	calls := make(map[key]*call, len(l.claims)+len(l.waits))
	for _, f := range l.waits {
		calls[f.key] = f.call
	}
	for _, f := range l.claims {
		calls[f.key] = f.call
	}
	l.waits = nil
	if claims := l.claims; len(claims) > 0 {
		l.claims = nil
		go s.fetchClaims(bg, claims, fetch)
	}
	// The first n: at hand, or awaited; those whose fetch was given up
	// are loaded again.
	var again []digest.Digest
	for _, k := range keys[:n] {
		if _, ok := l.got[k]; ok {
			continue
		}
		c := calls[k]
		select {
		case <-c.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for chunk %s: %w", k, ctx.Err())
		}
		switch {
		case c.err == nil:
			l.got[k] = c.b
		case errors.Is(c.err, errAbandoned), errors.Is(c.err, errFetchPanicked):
			again = append(again, k.digest())
			l.got[k] = nil
		default:
			return nil, c.err
		}
	}
	if len(again) > 0 {
		bufs, err := s.Load(ctx, again, fetch)
		if err != nil {
			return nil, err
		}
		for i, d := range again {
			k, _ := parseKey(d)
			l.got[k] = bufs[i]
		}
	}
	out := make([][]byte, len(keys))
	for i, k := range keys {
		out[i] = l.got[k]
	}
	return out, nil
}

// parseKeys returns the keys of ds, and each of them once.
func parseKeys(ds []digest.Digest) (keys, unique []key, err error) {
	keys = make([]key, len(ds))
	unique = make([]key, 0, len(ds))
	seen := make(map[key]struct{}, len(ds))
	for i, d := range ds {
		k, err := parseKey(d)
		if err != nil {
			return nil, nil, fmt.Errorf("load chunks: %w", err)
		}
		keys[i] = k
		if _, ok := seen[k]; !ok {
			seen[k] = struct{}{}
			unique = append(unique, k)
		}
	}
	return keys, unique, nil
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

// fetch fetches the claimed chunks with one call of fetch (see fetchClaims)
// and keeps their bytes. It returns the error of the first chunk that
// failed.
func (l *loader) fetch(ctx context.Context, fetch FetchFunc) error {
	claims := l.claims
	l.claims = nil
	if len(claims) == 0 {
		return nil
	}
	errs := l.s.fetchClaims(ctx, claims, fetch)
	var first error
	for i, c := range claims {
		if errs[i] == nil {
			l.got[c.key] = c.call.b
		} else if first == nil {
			first = errs[i]
		}
	}
	return first
}

// fetchClaims fetches the chunks claims with one call of fetch, verifies
// and stores each as fetch delivers or returns it, and completes every
// claim, also if fetch panics. It returns each claim's error.
func (s *Store) fetchClaims(ctx context.Context, claims []flight, fetch FetchFunc) []error {
	missing := make([]digest.Digest, len(claims))
	index := make(map[digest.Digest]int, len(claims))
	for i, c := range claims {
		missing[i] = c.key.digest()
		index[missing[i]] = i
	}
	var mu sync.Mutex
	errs := make([]error, len(claims))
	completed := make([]bool, len(claims)) // guarded by mu
	// finish completes claim i, unless it is already; b is nil if err is
	// not.
	finish := func(i int, b []byte, err, shared error) {
		mu.Lock()
		defer mu.Unlock()
		if completed[i] {
			return
		}
		completed[i], errs[i] = true, err
		s.complete(claims[i], b, shared)
	}
	isCompleted := func(i int) bool {
		mu.Lock()
		defer mu.Unlock()
		return completed[i]
	}
	// verified verifies and stores the bytes b of claim i and completes
	// it, and returns the error of bytes that do not verify.
	verified := func(i int, b []byte) error {
		if isCompleted(i) {
			return nil
		}
		err := verify(claims[i].key, b)
		if err == nil {
			s.keep(ctx, claims[i].key, b)
		} else {
			b = nil
		}
		finish(i, b, err, err)
		return err
	}
	deliver := func(d digest.Digest, b []byte) error {
		if i, ok := index[d]; ok {
			return verified(i, b)
		}
		return nil
	}
	defer func() {
		for i := range claims { // fetch panicked, or the claim is complete
			finish(i, nil, errFetchPanicked, errFetchPanicked)
		}
	}()
	got, ferr := fetch(ctx, missing, deliver)
	abandoned := ferr != nil && ctx.Err() != nil

	for i, c := range claims {
		if b, ok := got[missing[i]]; ok {
			verified(i, b)
			continue
		}
		err := fmt.Errorf("fetch chunk %s: %w", c.key, errNotReturned)
		shared := err
		if ferr != nil {
			err = fmt.Errorf("fetch chunk %s: %w", c.key, ferr)
			shared = err
			if abandoned {
				shared = errAbandoned
			}
		}
		finish(i, nil, err, shared)
	}
	return errs
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
