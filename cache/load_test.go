package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// source is a fake registry for Load: it serves chunks and counts how often
// each was fetched.
type source struct {
	mu      sync.Mutex
	chunks  map[digest.Digest][]byte
	fetched map[digest.Digest]int // guarded by mu
	calls   int                   // guarded by mu
}

func newSource(n, size int) (*source, []digest.Digest) {
	src := &source{chunks: map[digest.Digest][]byte{}, fetched: map[digest.Digest]int{}}
	ds := make([]digest.Digest, n)
	for i := range ds {
		d, b := random(uint64(1000+i), size)
		src.chunks[d] = b
		ds[i] = d
	}
	return src, ds
}

func (src *source) fetch(ctx context.Context, missing []digest.Digest, _ Deliver) (map[digest.Digest][]byte, error) {
	src.mu.Lock()
	defer src.mu.Unlock()
	src.calls++
	got := make(map[digest.Digest][]byte, len(missing))
	for _, d := range missing {
		src.fetched[d]++
		got[d] = src.chunks[d]
	}
	return got, nil
}

func (src *source) counts() (calls int, fetched map[digest.Digest]int) {
	src.mu.Lock()
	defer src.mu.Unlock()
	fetched = make(map[digest.Digest]int, len(src.fetched))
	for d, n := range src.fetched {
		fetched[d] = n
	}
	return src.calls, fetched
}

// checkLoaded checks that Load returned the bytes of ds.
func (src *source) checkLoaded(t testing.TB, ds []digest.Digest, got [][]byte) {
	t.Helper()
	if len(got) != len(ds) {
		t.Fatalf("Load returned %d chunks for %d digests", len(got), len(ds))
	}
	for i, d := range ds {
		if !bytes.Equal(got[i], src.chunks[d]) {
			t.Errorf("Load returned other bytes for chunk %d, %s", i, d)
		}
	}
}

// noFetch is a fetch function that fails the test if called.
func noFetch(t testing.TB) FetchFunc {
	return func(_ context.Context, missing []digest.Digest, _ Deliver) (map[digest.Digest][]byte, error) {
		t.Errorf("fetch called for %v", missing)
		return nil, errors.New("unexpected fetch")
	}
}

// waitUntil polls cond, which another goroutine makes true.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// misses returns a condition that holds once the store counted n misses: a
// Load counts its misses before it waits for or fetches them.
func misses(s *Store, n int64) func() bool {
	return func() bool { return s.Stats().Misses >= n }
}

func TestLoad(t *testing.T) {
	src, ds := newSource(6, 1000)
	tests := []struct {
		name    string
		stored  []int // chunks in the store before Load
		load    []int
		fetched []int // chunks fetch is asked for, in one call
	}{
		{"all stored", []int{0, 1, 2}, []int{2, 0, 1}, nil},
		{"none stored", nil, []int{0, 1, 2}, []int{0, 1, 2}},
		{"some stored", []int{1, 3}, []int{0, 1, 2, 3, 4}, []int{0, 2, 4}},
		{"repeated digests", []int{1}, []int{0, 1, 0, 1, 2, 0}, []int{0, 2}},
		{"nothing", nil, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, t.TempDir(), 0)
			for _, i := range tt.stored {
				mustPut(t, s, ds[i], src.chunks[ds[i]])
			}
			var load []digest.Digest
			for _, i := range tt.load {
				load = append(load, ds[i])
			}
			var asked [][]digest.Digest
			fetch := func(ctx context.Context, missing []digest.Digest, _ Deliver) (map[digest.Digest][]byte, error) {
				asked = append(asked, missing)
				return src.fetch(ctx, missing, nil)
			}
			got, err := s.Load(t.Context(), load, fetch)
			if err != nil {
				t.Fatal(err)
			}
			src.checkLoaded(t, load, got)
			var want [][]digest.Digest
			if tt.fetched != nil {
				want = [][]digest.Digest{nil}
				for _, i := range tt.fetched {
					want[0] = append(want[0], ds[i])
				}
			}
			if fmt.Sprint(asked) != fmt.Sprint(want) {
				t.Errorf("fetch asked for %v, want %v", asked, want)
			}
			for _, d := range load {
				checkGet(t, s, d, src.chunks[d])
			}
			checkDisk(t, s)
		})
	}
}

// TestLoadConcurrent loads overlapping sets of chunks from many goroutines:
// each chunk is fetched exactly once.
func TestLoadConcurrent(t *testing.T) {
	const loaders, chunks, perLoad = 20, 50, 30
	src, ds := newSource(chunks, 4<<10)
	s := openStore(t, t.TempDir(), 0)
	for _, i := range []int{7, 21, 33} { // a few hits as well
		mustPut(t, s, ds[i], src.chunks[ds[i]])
	}
	// A fetch that takes a while, so that Loads overlap.
	fetch := func(ctx context.Context, missing []digest.Digest, _ Deliver) (map[digest.Digest][]byte, error) {
		time.Sleep(time.Millisecond)
		return src.fetch(ctx, missing, nil)
	}
	start := make(chan struct{})
	var wg sync.WaitGroup
	for g := range loaders {
		wg.Go(func() {
			var load []digest.Digest
			for j := range perLoad {
				i := (g*7 + j*3) % chunks // overlapping sets in different orders
				load = append(load, ds[i])
			}
			<-start
			got, err := s.Load(t.Context(), load, fetch)
			if err != nil {
				t.Error(err)
				return
			}
			src.checkLoaded(t, load, got)
		})
	}
	close(start)
	wg.Wait()

	_, fetched := src.counts()
	for i, d := range ds {
		want := 1
		if i == 7 || i == 21 || i == 33 {
			want = 0
		}
		if fetched[d] != want {
			t.Errorf("chunk %d fetched %d times, want %d", i, fetched[d], want)
		}
	}
	checkDisk(t, s)
	if st := s.Stats(); st.Chunks != chunks {
		t.Errorf("%d chunks stored, want %d", st.Chunks, chunks)
	}
}

// TestLoadBadFetch checks what Load does when fetch fails or lies: the error
// names the chunk, nothing wrong is stored, and the next Load fetches again.
func TestLoadBadFetch(t *testing.T) {
	src, ds := newSource(3, 1000)
	good, bad := ds[0], ds[1]
	errBoom := errors.New("boom")
	tests := []struct {
		name  string
		reply func(missing []digest.Digest) (map[digest.Digest][]byte, error)
		want  error         // nil: any error
		names digest.Digest // the chunk the error names
	}{
		{"wrong bytes", func([]digest.Digest) (map[digest.Digest][]byte, error) {
			return map[digest.Digest][]byte{good: src.chunks[good], bad: src.chunks[good]}, nil
		}, ErrDigestMismatch, bad},
		{"cut short", func([]digest.Digest) (map[digest.Digest][]byte, error) {
			return map[digest.Digest][]byte{good: src.chunks[good], bad: src.chunks[bad][:999]}, nil
		}, ErrDigestMismatch, bad},
		{"missing", func([]digest.Digest) (map[digest.Digest][]byte, error) {
			return map[digest.Digest][]byte{good: src.chunks[good]}, nil
		}, nil, bad},
		{"error with part of the reply", func([]digest.Digest) (map[digest.Digest][]byte, error) {
			return map[digest.Digest][]byte{good: src.chunks[good]}, errBoom
		}, errBoom, bad},
		{"error", func([]digest.Digest) (map[digest.Digest][]byte, error) {
			return nil, errBoom
		}, errBoom, good},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, t.TempDir(), 0)
			fetch := func(_ context.Context, missing []digest.Digest, _ Deliver) (map[digest.Digest][]byte, error) {
				return tt.reply(missing)
			}
			got, err := s.Load(t.Context(), []digest.Digest{good, bad}, fetch)
			if err == nil || got != nil {
				t.Fatalf("Load = %d chunks, %v; want an error", len(got), err)
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("Load: %v, want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.names.String()) {
				t.Errorf("Load: %v, does not name %s", err, tt.names)
			}
			checkGet(t, s, bad, nil)
			if tt.names == good {
				checkGet(t, s, good, nil)
			} else {
				checkGet(t, s, good, src.chunks[good]) // verified bytes are kept
			}
			checkDisk(t, s)

			ds := []digest.Digest{good, bad}
			got, err = s.Load(t.Context(), ds, src.fetch)
			if err != nil {
				t.Fatalf("Load after the failure: %v", err)
			}
			src.checkLoaded(t, ds, got)
			checkDisk(t, s)
		})
	}
}

// blockedFetch starts a Load of ds whose fetch blocks until release is
// closed, then returns reply's answer. It returns once the Load is fetching,
// and a channel with the Load's error.
func blockedFetch(t *testing.T, s *Store, ctx context.Context, ds []digest.Digest,
	reply FetchFunc,
) (release chan struct{}, result chan error) {
	t.Helper()
	release = make(chan struct{})
	result = make(chan error, 1)
	fetching := make(chan struct{})
	fetch := func(ctx context.Context, missing []digest.Digest, deliver Deliver) (map[digest.Digest][]byte, error) {
		close(fetching)
		<-release
		return reply(ctx, missing, deliver)
	}
	go func() {
		_, err := s.Load(ctx, ds, fetch)
		result <- err
	}()
	<-fetching
	return release, result
}

// TestLoadWaitersShareError checks that the Loads waiting for a fetch that
// fails get its error, and that the next Load fetches again.
func TestLoadWaitersShareError(t *testing.T) {
	src, ds := newSource(2, 1000)
	s := openStore(t, t.TempDir(), 0)
	errBoom := errors.New("boom")
	release, fetcher := blockedFetch(t, s, t.Context(), ds, func(context.Context, []digest.Digest, Deliver) (map[digest.Digest][]byte, error) {
		return nil, errBoom
	})
	const waiters = 5
	results := make(chan error, waiters)
	for range waiters {
		go func() {
			_, err := s.Load(t.Context(), ds[1:], noFetch(t))
			results <- err
		}()
	}
	waitUntil(t, "the Loads wait", misses(s, 2+waiters))
	close(release)
	for range waiters + 1 {
		var err error
		select {
		case err = <-fetcher:
		case err = <-results:
		}
		if !errors.Is(err, errBoom) {
			t.Errorf("Load: %v, want %v", err, errBoom)
		}
	}
	got, err := s.Load(t.Context(), ds, src.fetch)
	if err != nil {
		t.Fatal(err)
	}
	src.checkLoaded(t, ds, got)
	checkDisk(t, s)
}

// TestLoadWaiterCanceled cancels a Load that waits for another's fetch: it
// returns at once, and the fetch goes on.
func TestLoadWaiterCanceled(t *testing.T) {
	src, ds := newSource(1, 1000)
	s := openStore(t, t.TempDir(), 0)
	release, fetcher := blockedFetch(t, s, t.Context(), ds, src.fetch)

	ctx, cancel := context.WithCancel(t.Context())
	waiter := make(chan error, 1)
	go func() {
		_, err := s.Load(ctx, ds, noFetch(t))
		waiter <- err
	}()
	waitUntil(t, "the Load waits", misses(s, 2))
	cancel()
	if err := <-waiter; !errors.Is(err, context.Canceled) { // while the fetch still blocks
		t.Errorf("canceled Load: %v, want context.Canceled", err)
	}
	close(release)
	if err := <-fetcher; err != nil {
		t.Errorf("fetching Load: %v", err)
	}
	checkGet(t, s, ds[0], src.chunks[ds[0]])
}

// TestLoadFetcherGivesUp cancels a Load while it fetches: the Loads waiting
// for it fetch the chunks themselves.
func TestLoadFetcherGivesUp(t *testing.T) {
	src, ds := newSource(3, 1000)
	s := openStore(t, t.TempDir(), 0)
	ctx, cancel := context.WithCancel(t.Context())
	release, fetcher := blockedFetch(t, s, ctx, ds[:2], func(ctx context.Context, _ []digest.Digest, _ Deliver) (map[digest.Digest][]byte, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	})
	close(release)

	waiter := make(chan error, 1)
	go func() {
		got, err := s.Load(t.Context(), ds, src.fetch) // waits for 0 and 1, fetches 2
		if err == nil {
			src.checkLoaded(t, ds, got)
		}
		waiter <- err
	}()
	waitUntil(t, "the Load waits", misses(s, 5))
	cancel()
	if err := <-fetcher; !errors.Is(err, context.Canceled) {
		t.Errorf("canceled Load: %v, want context.Canceled", err)
	}
	if err := <-waiter; err != nil {
		t.Errorf("waiting Load: %v", err)
	}
	if calls, fetched := src.counts(); calls != 2 || len(fetched) != 3 {
		t.Errorf("the waiting Load fetched %d times, chunks %v; want twice, 3 chunks once each", calls, fetched)
	}
	checkDisk(t, s)
}

// TestLoadFetchPanics checks that a fetch that panics does not leave waiting
// Loads stuck.
func TestLoadFetchPanics(t *testing.T) {
	src, ds := newSource(1, 1000)
	s := openStore(t, t.TempDir(), 0)
	panicked := make(chan any, 1)
	release := make(chan struct{})
	fetching := make(chan struct{})
	go func() {
		defer func() { panicked <- recover() }()
		_, _ = s.Load(t.Context(), ds, func(context.Context, []digest.Digest, Deliver) (map[digest.Digest][]byte, error) {
			close(fetching)
			<-release
			panic("fetch broke")
		})
	}()
	<-fetching
	waiter := make(chan error, 1)
	go func() {
		_, err := s.Load(t.Context(), ds, src.fetch)
		waiter <- err
	}()
	waitUntil(t, "the Load waits", misses(s, 2))
	close(release)
	if p := <-panicked; p != "fetch broke" {
		t.Errorf("recovered %v", p)
	}
	if err := <-waiter; err != nil {
		t.Errorf("waiting Load: %v", err)
	}
	checkGet(t, s, ds[0], src.chunks[ds[0]])
}

// TestLoadBounded loads more than a bounded store holds: Load returns every
// chunk, the store keeps the most recent ones within its bound, and a chunk
// larger than the bound is returned but not stored.
func TestLoadBounded(t *testing.T) {
	src, ds := newSource(5, 1000)
	big, bigBytes := random(99, 3500)
	src.chunks[big] = bigBytes
	s := openStore(t, t.TempDir(), 3000)
	load := append(ds[:len(ds):len(ds)], big)
	// The first Load stores 0 to 4 in order, evicting 0 and 1; the second
	// finds 2, 3 and 4, then stores 0 and 1, evicting 2 and 3.
	for round, want := range []string{"2 3 4", "0 1 4"} {
		got, err := s.Load(t.Context(), load, src.fetch)
		if err != nil {
			t.Fatal(err)
		}
		src.checkLoaded(t, load, got)
		checkDisk(t, s)
		var held []string
		for i, d := range load {
			if s.Has(d) {
				held = append(held, fmt.Sprint(i))
			}
		}
		if got := strings.Join(held, " "); got != want {
			t.Errorf("after Load %d: chunks %s held, want %s", round+1, got, want)
		}
	}
	_, fetched := src.counts()
	for i, want := range []int{2, 2, 1, 1, 1, 2} {
		if fetched[load[i]] != want {
			t.Errorf("chunk %d fetched %d times, want %d", i, fetched[load[i]], want)
		}
	}
}

func BenchmarkLoadHit(b *testing.B) {
	src, ds := newSource(16, 64<<10)
	s := openStore(b, b.TempDir(), 0)
	for _, d := range ds {
		mustPut(b, s, d, src.chunks[d])
	}
	b.SetBytes(int64(len(ds)) * 64 << 10)
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.Load(b.Context(), ds, noFetch(b)); err != nil {
			b.Fatal(err)
		}
	}
}

// TestFetching: a chunk is reported as being fetched while a Load's fetch
// of it is under way, and not before or after.
func TestFetching(t *testing.T) {
	src, ds := newSource(2, 1000)
	s := openStore(t, t.TempDir(), 0)
	if s.Fetching(ds[0]) {
		t.Fatal("a chunk no Load asked for is reported as being fetched")
	}
	release, fetcher := blockedFetch(t, s, t.Context(), ds[:1], src.fetch)
	if !s.Fetching(ds[0]) {
		t.Error("a chunk whose fetch is under way is not reported as being fetched")
	}
	if s.Fetching(ds[1]) {
		t.Error("a chunk nobody fetches is reported as being fetched")
	}
	close(release)
	if err := <-fetcher; err != nil {
		t.Fatalf("fetching Load: %v", err)
	}
	if s.Fetching(ds[0]) {
		t.Error("a chunk fetched and stored is still reported as being fetched")
	}
	if s.Fetching("sha256:nonsense") {
		t.Error("a malformed digest is reported as being fetched")
	}
}

// TestLoadDelivered checks that a chunk fetch hands over before it returns
// reaches the Loads waiting for it at once, verified and stored, and that
// bytes that do not verify reach none of them.
func TestLoadDelivered(t *testing.T) {
	src, ds := newSource(3, 1000)
	s := openStore(t, t.TempDir(), 0)
	fetching, deliverNow, release := make(chan struct{}), make(chan struct{}), make(chan struct{})
	fetched := make(chan error, 1)
	go func() {
		got, err := s.Load(t.Context(), ds, func(_ context.Context, missing []digest.Digest, deliver Deliver) (map[digest.Digest][]byte, error) {
			close(fetching)
			<-deliverNow
			if err := deliver(ds[0], src.chunks[ds[0]]); err != nil {
				t.Errorf("deliver of a chunk: %v", err)
			}
			if err := deliver(ds[1], src.chunks[ds[0]]); !errors.Is(err, ErrDigestMismatch) { // wrong bytes
				t.Errorf("deliver of wrong bytes: %v, want %v", err, ErrDigestMismatch)
			}
			<-release
			return map[digest.Digest][]byte{ds[1]: src.chunks[ds[1]], ds[2]: src.chunks[ds[2]]}, nil
		})
		if err == nil {
			err = errors.New("the Load succeeded with wrong bytes for a chunk")
		}
		if got != nil {
			t.Errorf("the fetching Load returned %d chunks with its error", len(got))
		}
		fetched <- err
	}()
	<-fetching
	type result struct {
		got [][]byte
		err error
	}
	waiters := make([]chan result, 2)
	for i := range waiters {
		waiters[i] = make(chan result, 1)
		go func() {
			got, err := s.Load(t.Context(), ds[i:i+1], noFetch(t))
			waiters[i] <- result{got, err}
		}()
	}
	waitUntil(t, "the Loads wait", misses(s, 3+2))
	close(deliverNow)
	for i, w := range waiters {
		var r result
		select {
		case r = <-w:
		case <-time.After(30 * time.Second):
			close(release)
			t.Fatalf("the Load waiting for chunk %d did not return before the fetch did", i)
		}
		switch i {
		case 0:
			if r.err != nil {
				t.Fatalf("Load of a delivered chunk: %v", r.err)
			}
			src.checkLoaded(t, ds[:1], r.got)
		case 1:
			if !errors.Is(r.err, ErrDigestMismatch) {
				t.Errorf("Load of a chunk delivered with wrong bytes: %v, want %v", r.err, ErrDigestMismatch)
			}
		}
	}
	checkGet(t, s, ds[0], src.chunks[ds[0]])
	checkGet(t, s, ds[1], nil)
	close(release)
	if err := <-fetched; !errors.Is(err, ErrDigestMismatch) {
		t.Errorf("the fetching Load: %v, want %v", err, ErrDigestMismatch)
	}
	checkGet(t, s, ds[2], src.chunks[ds[2]])
	checkGet(t, s, ds[1], nil) // its later, right bytes came too late
	checkDisk(t, s)
}

// TestLoadFirst checks that LoadFirst returns once its first chunks are
// there, while the rest of its fetch goes on under bg, also after the
// caller's ctx is done.
func TestLoadFirst(t *testing.T) {
	src, ds := newSource(4, 1000)
	s := openStore(t, t.TempDir(), 0)
	mustPut(t, s, ds[3], src.chunks[ds[3]])
	release := make(chan struct{})
	var fetchCtx context.Context
	returned := make(chan struct{})
	fetch := func(ctx context.Context, missing []digest.Digest, deliver Deliver) (map[digest.Digest][]byte, error) {
		fetchCtx = ctx
		if err := deliver(ds[0], src.chunks[ds[0]]); err != nil {
			t.Errorf("deliver: %v", err)
		}
		<-release
		defer close(returned)
		return src.fetch(ctx, missing, nil)
	}
	ctx, cancel := context.WithCancel(t.Context())
	got, err := s.LoadFirst(ctx, t.Context(), ds, 1, fetch)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(ds) || !bytes.Equal(got[0], src.chunks[ds[0]]) || got[1] != nil || got[2] != nil ||
		!bytes.Equal(got[3], src.chunks[ds[3]]) {
		t.Fatalf("LoadFirst returned %d chunks, not the first and the stored one alone", len(got))
	}
	close(release)
	<-returned
	if fetchCtx.Err() != nil {
		t.Errorf("the fetch ran under the caller's ctx: %v", fetchCtx.Err())
	}
	got, err = s.Load(t.Context(), ds, noFetch(t)) // waits for the fetch to complete its claims
	if err != nil {
		t.Fatal(err)
	}
	src.checkLoaded(t, ds, got)
	if calls, fetched := src.counts(); calls != 1 || fetched[ds[0]] != 1 || fetched[ds[3]] != 0 {
		t.Errorf("%d fetches, %v; want one, without the stored chunk", calls, fetched)
	}
	checkDisk(t, s)
}

// TestLoadFirstAbandoned checks that LoadFirst loads its first chunks
// itself when the fetch under bg gives up.
func TestLoadFirstAbandoned(t *testing.T) {
	src, ds := newSource(2, 1000)
	s := openStore(t, t.TempDir(), 0)
	bg, cancel := context.WithCancel(t.Context())
	cancel()
	fetch := func(ctx context.Context, missing []digest.Digest, _ Deliver) (map[digest.Digest][]byte, error) {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return src.fetch(ctx, missing, nil)
	}
	got, err := s.LoadFirst(t.Context(), bg, ds, 1, fetch)
	if err != nil {
		t.Fatal(err)
	}
	src.checkLoaded(t, ds[:1], got[:1])
	if _, fetched := src.counts(); fetched[ds[0]] != 1 || fetched[ds[1]] != 0 {
		t.Errorf("fetched %v; want the first chunk once, the second not", fetched)
	}
}
