package lazy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"github.com/lazylayer/lazylayer/cache"
	"github.com/lazylayer/lazylayer/remote"
)

// Blob is the registry side of a lazy layer: any byte range of the blob.
type Blob interface {
	ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error)
}

// fetcher gets chunks: from the chunk cache, or from the blob, merging the
// chunks one read needs into as few ranged requests as possible. Every
// chunk is verified against its TOC digest before it is cached or served
// (cache.Store.Load verifies).
type fetcher struct {
	layer   digest.Digest
	blob    Blob
	cache   *cache.Store
	dec     estargz.Decompressor
	timeout time.Duration // how long a read waits while the registry sends nothing
	maxSpan int64         // largest merged request
	partial *partialBlob  // local copy of the blob, filled as bytes arrive; may be nil
	ix      *index        // for the chunks next to a read's in the blob
	minSpan int64         // an on-demand request covers at least this much of the blob

	act      *Activity    // on-demand requests of every layer; population yields to them
	metrics  Metrics      // told of bytes fetched, for the daemon's metrics endpoint
	requests atomic.Int64 // ranged requests made
	fetched  atomic.Int64 // compressed bytes received
	lastByte atomic.Int64 // when an on-demand request last received a byte, unix ns
	// blobFailing is set while the blob copy cannot be written and the log
	// has said so.
	blobFailing atomic.Bool

	failMu   sync.Mutex
	failures map[digest.Digest]failure // chunks of reads that timed out lately; guarded by failMu

	// fetchedAhead, for a layer without a blob copy, keeps what it fetched
	// for the layer's mount (see ReplayAhead); may be nil.
	fetchedAhead *Recorded

	// bg is the context of fetches that outlive the read that started
	// them (see loadFirst), canceled by stopBackground; nil: there are
	// none.
	bg       context.Context
	bgCancel context.CancelFunc
	bgMu     sync.Mutex
	bgClosed bool           // guarded by bgMu
	bgRuns   sync.WaitGroup // fetches under bg; added to under bgMu
}

// errClosing refuses a fetch that would outlive a read of a layer being
// closed.
var errClosing = errors.New("the layer is closing")

// startBackground lets reads leave their fetches running after they
// return (see loadFirst), until stopBackground.
func (f *fetcher) startBackground() {
	f.bg, f.bgCancel = context.WithCancel(context.Background())
}

// bgStart counts a fetch under f.bg, unless the fetcher is stopping
// them: then it returns false.
func (f *fetcher) bgStart() bool {
	f.bgMu.Lock()
	defer f.bgMu.Unlock()
	if f.bgClosed {
		return false
	}
	f.bgRuns.Add(1)
	return true
}

func (f *fetcher) bgDone() { f.bgRuns.Done() }

// stopBackground stops the fetches that outlived their reads and waits
// for them to return.
func (f *fetcher) stopBackground() {
	if f.bg == nil {
		return
	}
	f.bgMu.Lock()
	f.bgClosed = true
	f.bgMu.Unlock()
	f.bgCancel()
	f.bgRuns.Wait()
}

// Activity tracks the on-demand requests of all the lazy layers that share
// it, so that every layer's population yields to a read of any layer: a
// starting container reads from several layers, and the link is one. It
// also measures the link as those requests happen (see linkEstimate). The
// zero value is ready to use.
type Activity struct {
	inflight atomic.Int64 // on-demand reads under way
	last     atomic.Int64 // when the last one started or ended, unix ns
	requests atomic.Int64 // on-demand requests to the registry started
	link     linkEstimate
}

// readPiece is how much population reads of a reply between two looks at
// on-demand requests.
const readPiece = 32 << 10

// readUntilRequest reads r into b until b is full or an on-demand request
// starts, if none has since the count since, and returns how many bytes it
// read: population leaves the link to the request, keeping what arrived.
func (a *Activity) readUntilRequest(r io.Reader, b []byte, since int64) (int, error) {
	n := 0
	for n < len(b) && a.requests.Load() == since {
		m, err := io.ReadFull(r, b[n:min(len(b), n+readPiece)])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// Begin marks the start of on-demand work other than a read of a lazy
// layer's data, such as the pull of an image (reading its layers' TOCs,
// mounting them, fetching its plain layers): population yields the link
// and the CPUs to it as to a read, and a background request under way
// stops at once. The returned end marks it over; call it once.
func (a *Activity) Begin() (end func()) {
	a.start()
	a.requests.Add(1)
	var once sync.Once
	return func() { once.Do(a.done) }
}

// Hold marks a container about to start on a lazy layer: a background
// request under way stops at once, and population waits until d has
// passed and then the quiet time, unless the container's reads take over
// before (each of them counts as usual). Setting up a container (runc,
// mounts) takes a while before its first read, during which population
// would otherwise take the link and the CPUs.
func (a *Activity) Hold(d time.Duration) {
	a.Begin()()
	a.last.Store(time.Now().Add(d).UnixNano())
}

func (a *Activity) start() {
	a.inflight.Add(1)
	a.last.Store(time.Now().UnixNano())
}

func (a *Activity) done() {
	a.last.Store(time.Now().UnixNano())
	a.inflight.Add(-1)
}

// Busy reports whether on-demand work is under way: a lazy read, or work
// marked by Begin and not yet ended.
func (a *Activity) Busy() bool { return a.inflight.Load() > 0 }

// quietFor reports whether no on-demand read is under way or started or
// ended within d.
func (a *Activity) quietFor(d time.Duration) bool {
	return a.inflight.Load() == 0 && time.Since(time.Unix(0, a.last.Load())) >= d
}

// waitQuiet returns once no on-demand read has been under way for d, or
// with ctx's error.
func (a *Activity) waitQuiet(ctx context.Context, d time.Duration) error {
	for !a.quietFor(d) {
		select {
		case <-time.After(5 * time.Millisecond):
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	return nil
}

// verifyRetries is how often a chunk that failed verification is fetched
// again before the read fails.
const verifyRetries = 2

// errNoAnswer cancels a load once the registry has sent the layer nothing
// for the read timeout.
var errNoAnswer = errors.New("the registry sent nothing")

// retryWindow is how long the chunks of a read that timed out fail at once
// for the reads that follow: the kernel answers a failed read-ahead with a
// read of its own for the same bytes, which must not wait again.
const retryWindow = time.Second

// load returns the bytes of the chunks cs, in order. While the registry
// fails it retries, until the registry has sent this layer nothing for
// f.timeout (retries and remote's own timeouts included), but not when the
// registry answered that it does not have the blob; a chunk that failed
// verification is fetched again up to verifyRetries times.
func (f *fetcher) load(ctx context.Context, cs []chunk) ([][]byte, error) {
	return f.loadWith(ctx, cs, f.fetch)
}

// loadWith is load with get fetching the missing chunks of cs (f.fetch
// plans its own requests; a replay's groups are fetched whole).
func (f *fetcher) loadWith(ctx context.Context, cs []chunk, get getFunc) ([][]byte, error) {
	return f.loadFirst(ctx, cs, len(cs), get)
}

// getFunc fetches the chunks of cs whose digests are missing, handing
// each to deliver as soon as it has its bytes (see cache.FetchFunc).
type getFunc func(ctx context.Context, cs []chunk, missing []digest.Digest, deliver cache.Deliver) (map[digest.Digest][]byte, error)

// loadFirst is loadWith for a read that needs the first n chunks of cs
// only, and brings the others along: it returns once the first n are
// there (with nil for others it did not have at hand), while the request
// goes on under the fetcher's own context (see cache.Store.LoadFirst,
// fetcher.bg): the rest of a whole file, or a read-ahead, does not hold up
// the read.
func (f *fetcher) loadFirst(ctx context.Context, cs []chunk, n int, get getFunc) ([][]byte, error) {
	ds := make([]digest.Digest, len(cs))
	for i := range cs {
		ds[i] = cs[i].dgst()
	}
	fetch := func(ctx context.Context, missing []digest.Digest, deliver cache.Deliver) (map[digest.Digest][]byte, error) {
		if err := f.recentlyFailed(missing); err != nil {
			return nil, err
		}
		return get(ctx, cs, missing, deliver)
	}
	load := func(ctx context.Context) ([][]byte, error) { return f.cache.Load(ctx, ds, fetch) }
	if n < len(cs) && f.bg != nil {
		// The fetch outlives the read: it has its own watchdog, and
		// stops when the layer closes.
		bgFetch := func(ctx context.Context, missing []digest.Digest, deliver cache.Deliver) (map[digest.Digest][]byte, error) {
			if !f.bgStart() {
				return nil, errClosing
			}
			defer f.bgDone()
			wctx, stop := f.watch(ctx)
			defer stop()
			return fetch(wctx, missing, deliver)
		}
		load = func(ctx context.Context) ([][]byte, error) {
			return f.cache.LoadFirst(ctx, f.bg, ds, n, bgFetch)
		}
	}
	wctx, stop := f.watch(ctx)
	defer stop()
	backoff := 50 * time.Millisecond
	badData := 0
	var last error // the last failure other than the watchdog's
	for {
		bufs, err := load(wctx)
		if err == nil {
			return bufs, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if errors.Is(err, errRetrying) || errors.Is(err, remote.ErrNotFound) || errors.Is(err, errClosing) {
			// A registry that does not have the blob is up: waiting
			// for it does not help, nor for a layer being closed.
			return nil, err
		}
		if wctx.Err() != nil {
			if last == nil {
				last = err
			}
			err = fmt.Errorf("%w for %v: %w", errNoAnswer, f.timeout, last)
			f.failed(cs, err)
			return nil, err
		}
		if errors.Is(err, cache.ErrDigestMismatch) || errors.Is(err, errCorrupt) {
			// The local blob copy must not keep bytes that proved wrong.
			if f.partial != nil {
				for _, c := range cs {
					f.partial.forget(span{c.offset, c.end})
				}
			}
			if badData++; badData > verifyRetries {
				return nil, err
			}
			continue
		}
		last = err
		log.G(ctx).WithError(err).WithField("layer", f.layer).Debug("chunk fetch failed; retrying")
		select {
		case <-time.After(backoff):
		case <-wctx.Done():
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// watch returns ctx, canceled once the registry has sent this layer
// nothing for f.timeout since the call: no byte for this load, nor for any
// other on-demand read of the layer (a load may wait for chunks another one
// fetches). stop releases it.
func (f *fetcher) watch(ctx context.Context) (_ context.Context, stop func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	start := time.Now().UnixNano()
	var (
		mu      sync.Mutex
		timer   *time.Timer // guarded by mu
		stopped bool        // guarded by mu
	)
	mu.Lock()
	defer mu.Unlock()
	timer = time.AfterFunc(f.timeout, func() {
		last := max(start, f.lastByte.Load())
		if wait := time.Until(time.Unix(0, last).Add(f.timeout)); wait > 0 {
			mu.Lock()
			if !stopped {
				timer.Reset(wait)
			}
			mu.Unlock()
			return
		}
		cancel(errNoAnswer)
	})
	return ctx, func() {
		mu.Lock()
		stopped = true
		timer.Stop()
		mu.Unlock()
		cancel(nil)
	}
}

// errRetrying marks a fetch refused because a read that wanted the same
// chunks has just timed out (see retryWindow).
var errRetrying = errors.New("a read of these chunks has just timed out")

// failed records that the chunks cs timed out with err.
func (f *fetcher) failed(cs []chunk, err error) {
	now := time.Now()
	f.failMu.Lock()
	defer f.failMu.Unlock()
	for d, fl := range f.failures {
		if now.Sub(fl.at) >= retryWindow {
			delete(f.failures, d)
		}
	}
	if f.failures == nil {
		f.failures = make(map[digest.Digest]failure)
	}
	for _, c := range cs {
		f.failures[c.dgst()] = failure{now, err}
	}
}

// failure is a chunk of a read that timed out.
type failure struct {
	at  time.Time
	err error
}

// recentlyFailed returns an error wrapping errRetrying if every chunk of
// missing was part of a read that timed out within retryWindow.
func (f *fetcher) recentlyFailed(missing []digest.Digest) error {
	f.failMu.Lock()
	defer f.failMu.Unlock()
	var last failure
	for _, d := range missing {
		fl, ok := f.failures[d]
		if !ok || time.Since(fl.at) >= retryWindow {
			return nil
		}
		last = fl
	}
	if last.err == nil {
		return nil
	}
	return fmt.Errorf("%w: %w", errRetrying, last.err)
}

// missingChunks returns the chunks of cs whose digests are among missing,
// in cs's order, one for each digest (chunks with equal content are
// fetched once).
func missingChunks(cs []chunk, missing []digest.Digest) []chunk {
	want := make(map[digest.Digest]bool, len(missing))
	for _, d := range missing {
		want[d] = true
	}
	var todo []chunk
	for _, c := range cs {
		if d := c.dgst(); want[d] {
			todo = append(todo, c)
			delete(want, d)
		}
	}
	return todo
}

// errCorrupt marks a compressed stream that does not decompress.
var errCorrupt = errors.New("corrupt compressed chunk")

// fetch downloads the chunks among cs whose digests are missing.
func (f *fetcher) fetch(ctx context.Context, cs []chunk, missing []digest.Digest, deliver cache.Deliver) (map[digest.Digest][]byte, error) {
	todo := missingChunks(cs, missing)
	sort.Slice(todo, func(i, j int) bool {
		if todo[i].offset != todo[j].offset {
			return todo[i].offset < todo[j].offset
		}
		return todo[i].inner < todo[j].inner
	})
	out := make(map[digest.Digest][]byte, len(todo))
	var groups [][]chunk
	for len(todo) > 0 {
		n := f.span(todo)
		groups = append(groups, todo[:n])
		todo = todo[n:]
	}
	if len(groups) == 1 {
		if err := f.fetchSpan(ctx, groups[0], out, deliver); err != nil {
			return nil, err
		}
		return out, nil
	}
	// Requests for parts of the blob apart from each other go out
	// together, a few at a time: one round trip for all of them.
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(maxParallel)
	for _, cs := range groups {
		g.Go(func() error {
			got := make(map[digest.Digest][]byte, len(cs))
			if err := f.fetchSpan(gctx, cs, got, deliver); err != nil {
				return err
			}
			mu.Lock()
			maps.Copy(out, got)
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return out, nil
}

// maxParallel bounds the requests one load makes at once.
const maxParallel = 4

// span returns how many of the sorted chunks cs one request should cover:
// chunks whose compressed streams touch, up to maxSpan bytes.
func (f *fetcher) span(cs []chunk) int {
	start, end := cs[0].offset, cs[0].end
	n := 1
	for ; n < len(cs); n++ {
		c := cs[n]
		if c.offset > end || c.end-start > f.maxSpan {
			break
		}
		end = max(end, c.end)
	}
	return n
}

// fetchSpan downloads the compressed streams of cs in one ranged request
// and decompresses each chunk into out as soon as its stream has arrived,
// handing it to deliver (if not nil) at once.
func (f *fetcher) fetchSpan(ctx context.Context, cs []chunk, out map[digest.Digest][]byte, deliver cache.Deliver) error {
	start, end := cs[0].offset, cs[0].end
	for _, c := range cs {
		end = max(end, c.end)
	}
	next := 0 // the first chunk not decompressed yet
	arrived := func(buf []byte, n int64) error {
		for next < len(cs) {
			// Chunks sharing a compressed stream are decompressed
			// together.
			i, j, streamEnd := next, next+1, cs[next].end
			for j < len(cs) && cs[j].offset == cs[i].offset {
				streamEnd = max(streamEnd, cs[j].end)
				j++
			}
			if streamEnd-start > n {
				return nil
			}
			if err := f.decompress(buf[cs[i].offset-start:streamEnd-start], cs[i:j], out, deliver); err != nil {
				return err
			}
			next = j
		}
		return nil
	}
	_, err := f.read(ctx, span{start, end}, arrived)
	return err
}

// read returns the compressed bytes of s: from the local copy of the blob
// when it holds them, else from the registry (and then into the copy). It
// calls arrived with the buffer each time more of it has arrived, with how
// much has; an error from arrived ends the read with that error.
func (f *fetcher) read(ctx context.Context, s span, arrived func(buf []byte, n int64) error) ([]byte, error) {
	buf := make([]byte, s.len())
	if f.partial != nil && f.partial.has(s) {
		if _, err := f.partial.f.ReadAt(buf, s.start); err == nil {
			return buf, arrived(buf, s.len())
		}
	}
	f.act.start()
	defer f.act.done()
	f.act.requests.Add(1)
	t0 := time.Now()
	rc, err := f.blob.ReadRange(ctx, s.start, s.len())
	if err != nil {
		return nil, err
	}
	firstByte := time.Since(t0)
	n, err, stopped := readArriving(progress{rc, &f.lastByte}, buf, arrived)
	rc.Close()
	if err == nil {
		f.act.link.observe(firstByte, time.Since(t0), s.len())
	}
	log.G(ctx).WithFields(log.Fields{
		"layer": f.layer, "range": s.start, "bytes": s.len(), "firstByte": firstByte, "elapsed": time.Since(t0),
	}).Trace("on-demand request")
	f.requests.Add(1)
	f.fetched.Add(int64(n))
	f.metrics.Fetched(int64(n), false)
	if stopped {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("read bytes %d-%d: %w", s.start, s.end-1, err)
	}
	f.keep(ctx, buf, s.start)
	return buf, nil
}

// readArriving fills b from r, as io.ReadFull does, calling arrived after
// each read that returned bytes. stopped says that the error is arrived's.
func readArriving(r io.Reader, b []byte, arrived func([]byte, int64) error) (n int, err error, stopped bool) {
	for n < len(b) {
		m, rerr := r.Read(b[n:])
		n += m
		if m > 0 {
			if err := arrived(b, int64(n)); err != nil {
				return n, err, true
			}
		}
		switch {
		case n == len(b):
		case rerr == io.EOF:
			return n, io.ErrUnexpectedEOF, false
		case rerr != nil:
			return n, rerr, false
		}
	}
	return n, nil, false
}

// keep writes bytes fetched at off into the local blob copy, for
// population. Failing to (a full disk) is not an error for the read, which
// has the bytes; the log says when it starts failing and when it works
// again, not at every read.
func (f *fetcher) keep(ctx context.Context, b []byte, off int64) {
	if f.partial == nil {
		if f.fetchedAhead != nil {
			f.fetchedAhead.add(b, off)
		}
		return
	}
	err := f.partial.WriteAt(b, off)
	entry := log.G(ctx).WithField("layer", f.layer)
	switch {
	case err != nil && f.blobFailing.CompareAndSwap(false, true):
		entry.WithError(err).Warnf("cannot keep fetched bytes in the local blob copy: population will fetch them again; trying every %v", writeRetry)
	case err == nil && f.blobFailing.CompareAndSwap(true, false):
		entry.Info("keeping fetched bytes in the local blob copy again")
	}
}

// progress notes the time of each read that returns bytes.
type progress struct {
	r    io.Reader
	last *atomic.Int64 // unix ns
}

func (p progress) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.last.Store(time.Now().UnixNano())
	}
	return n, err
}

// decompress reads the chunks cs, sorted by inner offset, out of one
// compressed stream.
func (f *fetcher) decompress(stream []byte, cs []chunk, out map[digest.Digest][]byte, deliver cache.Deliver) error {
	dr, err := f.dec.Reader(bytes.NewReader(stream))
	if err != nil {
		return fmt.Errorf("chunk %s at blob offset %d: %w: %w", cs[0].dgst(), cs[0].offset, err, errCorrupt)
	}
	defer dr.Close()
	pos := int64(0)
	for _, c := range cs {
		if c.inner < pos {
			continue // same bytes as the previous chunk
		}
		if _, err := io.CopyN(io.Discard, dr, c.inner-pos); err != nil {
			return fmt.Errorf("chunk %s at blob offset %d: %w: %w", c.dgst(), c.offset, err, errCorrupt)
		}
		b := make([]byte, c.size)
		if _, err := io.ReadFull(dr, b); err != nil {
			return fmt.Errorf("chunk %s at blob offset %d: %w: %w", c.dgst(), c.offset, err, errCorrupt)
		}
		out[c.dgst()] = b
		if deliver != nil {
			// Bytes that do not verify end the request: none of it is
			// kept in the blob copy.
			if err := deliver(c.dgst(), b); err != nil {
				return err
			}
		}
		pos = c.inner + c.size
	}
	return nil
}

// plan returns the chunks a read fetches when it needs the chunks
// cs[i:j] of a file (cs: all of the file's chunks, in file order): those
// first, then the file's other chunks if the whole file is at most
// maxWholeFile of the blob, then, if all that spans less of the blob than
// f.reach, the chunks that follow in the blob up to that reach, whichever
// files they belong to: files next to each other in a layer are often
// read together, and a few more bytes in a request cost less than another
// round trip. Unless MinRequest is negative: then only cs[i:j].
func (f *fetcher) plan(cs []chunk, i, j int) []chunk {
	want := cs[i:j]
	if f.ix == nil || f.minSpan <= 0 || len(want) == 0 {
		return want
	}
	if len(cs) > 1 && cs[len(cs)-1].end-cs[0].offset <= maxWholeFile {
		// A file of a few chunks is fetched whole, in one request:
		// programs and libraries are read all over.
		want = append(slices.Clip(want), cs[:i]...)
		want = append(want, cs[j:]...)
	}
	lo, hi := want[0].offset, want[0].end
	for _, c := range want {
		lo, hi = min(lo, c.offset), max(hi, c.end)
	}
	reach := f.reach()
	if hi-lo >= reach {
		return want
	}
	return append(slices.Clip(want), f.ix.after(hi, lo+reach)...)
}

// reach is how much of the blob an on-demand request covers at least: the
// link's bandwidth-delay product as measured, bounded by MinRequest and
// maxReach (and MaxRequest).
func (f *fetcher) reach() int64 {
	return f.act.link.bdp(f.minSpan, max(f.minSpan, min(maxReach, f.maxSpan)))
}

// notFetching returns want without the chunks past its first n (those a
// read needs) that another load is fetching: they come anyway, and a read
// that asked for them would wait for all of that load's request, such as
// a directory read-ahead's, before it returns.
func (f *fetcher) notFetching(want []chunk, n int) []chunk {
	for k := n; k < len(want); k++ {
		if !f.cache.Fetching(want[k].dgst()) {
			continue
		}
		out := slices.Clone(want[:k])
		for _, c := range want[k+1:] {
			if !f.cache.Fetching(c.dgst()) {
				out = append(out, c)
			}
		}
		return out
	}
	return want
}

// maxWholeFile bounds the compressed size of a file a read fetches whole.
const maxWholeFile = 4 << 20

// maxReach bounds the bytes a small read brings along: those are a guess,
// and a wrong guess costs its bytes.
const maxReach = 256 << 10

// readAt reads file content at off into p. ahead is how many bytes past
// the read to fetch along with it (sequential reads read ahead).
func (f *fetcher) readAt(ctx context.Context, cs []chunk, size int64, p []byte, off, ahead int64) (int, error) {
	if off >= size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), size)
	i := sort.Search(len(cs), func(i int) bool { return cs[i].fileOff+cs[i].size > off })
	j := i
	for j < len(cs) && cs[j].fileOff < end {
		j++
	}
	need := j
	for j < len(cs) && cs[j].fileOff < end+ahead {
		j++
	}
	// A read whose chunks are all here costs no round trip: what a read
	// brings along (see plan) is worth its bytes only in a request the
	// read makes anyway. Files an access profile fetched (see replay)
	// are read so, whatever their neighbours.
	if n, ok := f.readCached(cs[i:need], cs[i:need], p, off, end); ok {
		return n, nil
	}
	// The read waits for its own chunks only: what it brings along keeps
	// arriving after it returns.
	want := f.notFetching(f.plan(cs, i, j), need-i)
	bufs, err := f.loadFirst(ctx, want, need-i, f.fetch)
	if errors.Is(err, errRetrying) && len(want) > need-i {
		// The chunks that timed out a moment ago may be only the ones
		// brought along, which this read does not need.
		bufs, err = f.load(ctx, cs[i:need])
	}
	if err != nil {
		return 0, err
	}
	n := 0
	for k := i; k < need; k++ {
		c, b := cs[k], bufs[k-i]
		if int64(len(b)) != c.size {
			// Two TOC chunks with one digest but different sizes.
			return 0, fmt.Errorf("chunk %s is %d bytes, the TOC says %d: %w", c.dgst(), len(b), c.size, errCorrupt)
		}
		lo := max(off, c.fileOff) - c.fileOff
		hi := min(end, c.fileOff+c.size) - c.fileOff
		n += copy(p[n:], b[lo:hi])
	}
	return n, nil
}

// readCached serves a read of the bytes [off, end) of a file, held by the
// chunks need, straight from the chunk cache when every chunk of want (the
// chunks the read would load, need among them) is there: then load would
// fetch nothing, and reading only the bytes asked for costs a few pages
// instead of whole chunks (a 128 KiB read of a 4 MiB chunk read all 4 MiB).
// The cached bytes were verified when they were stored (see cache.Store).
// ok is false when the read must go through load: a chunk is missing, or
// went missing meanwhile, is cached with another size than the TOC's, or
// cannot be read (load reports why).
func (f *fetcher) readCached(need, want []chunk, p []byte, off, end int64) (n int, ok bool) {
	if !f.cachedFile(want) {
		return 0, false
	}
	for k := range need {
		c := &need[k]
		lo := max(off, c.fileOff) - c.fileOff
		hi := min(end, c.fileOff+c.size) - c.fileOff
		if ok, err := f.cache.ReadAt(c.dgst(), c.size, p[n:n+int(hi-lo)], lo); err != nil || !ok {
			return 0, false
		}
		n += int(hi - lo)
	}
	return n, true
}
