package lazy

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/time/rate"

	"github.com/lazylayer/lazylayer/fs/extract"
)

// PopulateOptions tune the background download of a lazy layer.
type PopulateOptions struct {
	// Concurrency is the number of ranged requests in flight (default 2).
	Concurrency int
	// RangeSize is the size of one ranged request (default 1 MiB). An
	// on-demand read may wait behind one range per connection, so smaller
	// is kinder to starting containers on slow links.
	RangeSize int64
	// Limit, if set, bounds population's bandwidth; on-demand reads are
	// not limited.
	Limit *rate.Limiter
	// Quiet is how long after an on-demand request population waits
	// before its next request, and before it decompresses and extracts
	// more (default 300 ms): a starting container reads in bursts, and
	// each burst should find the link and the CPUs free, so population
	// fills the pauses between them.
	Quiet time.Duration
	// DiffID, if set, is the digest the layer's uncompressed tar must
	// have: the image config's (containerd hands it to the snapshotter as
	// a label). containerd names snapshots after these digests and shares
	// a snapshot between images by that name, so a layer whose config
	// names other content must never turn local. Checked once the whole
	// blob is in.
	DiffID digest.Digest
}

// Progress is how far population got.
type Progress struct {
	// Held is how many bytes of the blob the local blob copy holds: the
	// bytes population will not fetch, whether on-demand reads or
	// population fetched them, before a restart of the daemon or after
	// (the copy records its ranges as they arrive). Chunks that are only
	// in the chunk cache do not count: they spare reads the registry, not
	// population, which needs the blob's own compressed bytes to check
	// its digest.
	Held    int64
	Size    int64         // size of the blob
	Fetched int64         // bytes population fetched itself
	Elapsed time.Duration // since population started; 0 if it has not
}

// Progress reports population's progress.
func (l *Layer) Progress() Progress {
	p := Progress{Size: l.desc.Size, Fetched: l.popFetched.Load()}
	if l.f.partial != nil {
		p.Held = l.f.partial.held()
	}
	if start := l.popStart.Load(); start != 0 {
		p.Elapsed = time.Since(time.Unix(0, start))
	}
	return p
}

// Populate downloads what the local copy of the blob lacks (on-demand reads
// go first) and, at the same time, extracts the blob in order as its bytes
// arrive into dir, an empty directory, hiding eStargz's metadata files as
// the lazy tree does; the whole blob is verified against the layer digest
// once the last byte is in. On success dir holds the complete, verified
// tree; on error dir may hold part of it and must be discarded. A blob
// that fails verification is forgotten, so the next attempt fetches it
// again.
func (l *Layer) Populate(ctx context.Context, dir string, o PopulateOptions) error {
	return l.populate(ctx, dir, o, nil)
}

// populate is Populate, calling onEntry (see extract.Options.OnEntry).
func (l *Layer) populate(ctx context.Context, dir string, o PopulateOptions, onEntry func(*tar.Header) error) error {
	if l.f.partial == nil {
		return errors.New("populate: the layer has no local blob copy")
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 2
	}
	if o.RangeSize <= 0 {
		o.RangeSize = 1 << 20
	}
	if o.Quiet <= 0 {
		o.Quiet = 300 * time.Millisecond
	}
	l.popStart.CompareAndSwap(0, time.Now().UnixNano())
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	downloaded := make(chan error, 1)
	go func() {
		err := l.download(ctx, o)
		if err != nil {
			cancel(err)
		}
		downloaded <- err
	}()
	// Decompressing and extracting take CPU a starting container needs:
	// they pause while on-demand reads are under way, as downloading does.
	src := yielding{ctx: ctx, r: l.f.partial.follow(ctx), act: l.f.act, quiet: o.Quiet}
	_, err := extract.Layer(ctx, src, dir, extract.Options{
		Digest: l.desc.Digest, Size: l.desc.Size, DiffID: o.DiffID, HideRoot: FormatNames(), OnEntry: onEntry,
		Abort: func(err error) { cancel(err) }, // src's Read returns
	})
	if err != nil {
		cancel(err)
	}
	<-downloaded
	saveErr := l.f.partial.save()
	switch {
	case err == nil:
		// Every byte arrived and the whole blob matched its digest,
		// whatever became of a request on-demand reads overtook.
		return saveErr
	case errors.Is(err, extract.ErrDiffID):
		// The blob matched its digest: the copy is right, the config
		// is not.
		return errors.Join(err, saveErr)
	case errors.Is(err, extract.ErrInvalid):
		l.f.partial.reset()
		return err
	default:
		// Whichever failed first is the reason; the other only stopped.
		return context.Cause(ctx)
	}
}

// download fetches every missing range of the blob into the local copy.
func (l *Layer) download(ctx context.Context, o PopulateOptions) error {
	todo := make(chan span)
	errc := make(chan error, o.Concurrency)
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for i := 0; i < o.Concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range todo {
				if err := l.fetchRange(ctx, s, o); err != nil {
					errc <- err
					cancel()
					return
				}
			}
		}()
	}
feed:
	for _, s := range l.f.partial.missing(o.RangeSize) {
		select {
		case todo <- s:
		case <-ctx.Done():
			break feed
		}
	}
	close(todo)
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return ctx.Err()
	}
}

// fetchRange fetches what of s the local copy lacks, after any on-demand
// reads: those may have filled parts of s since population planned it. A
// request an on-demand one overtook is resumed once the link is quiet.
func (l *Layer) fetchRange(ctx context.Context, s span, o PopulateOptions) error {
	for {
		if err := l.f.act.waitQuiet(ctx, o.Quiet); err != nil {
			return err
		}
		overtaken := false
		for _, g := range l.f.partial.missingIn(s, s.len()) {
			done, err := l.fetchGap(ctx, g, o.Limit)
			if err != nil {
				return err
			}
			if !done {
				overtaken = true
				break
			}
		}
		if !overtaken {
			return nil
		}
	}
}

// yielding reads r once no on-demand request has been under way for quiet:
// what consumes it (population's extraction) pauses while a container
// reads on demand.
type yielding struct {
	ctx   context.Context
	r     io.Reader
	act   *Activity
	quiet time.Duration
}

func (y yielding) Read(b []byte) (int, error) {
	if err := y.act.waitQuiet(y.ctx, y.quiet); err != nil {
		return 0, err
	}
	return y.r.Read(b)
}

// fetchGap fetches g into the local copy, or its first part: once an
// on-demand request starts, it keeps what has arrived and reports false,
// leaving the link to the on-demand request. While the copy cannot be
// written (see writeRetry) it fetches nothing.
func (l *Layer) fetchGap(ctx context.Context, g span, limit *rate.Limiter) (bool, error) {
	if err := l.f.partial.writable(); err != nil {
		return false, fmt.Errorf("populate: local blob copy: %w", err)
	}
	if limit != nil {
		for n := g.len(); n > 0; n -= int64(limit.Burst()) {
			if err := limit.WaitN(ctx, int(min(n, int64(limit.Burst())))); err != nil {
				return false, err
			}
		}
	}
	since := l.f.act.requests.Load()
	rc, err := l.f.blob.ReadRange(ctx, g.start, g.len())
	if err != nil {
		return false, err
	}
	defer rc.Close()
	buf := make([]byte, g.len())
	n, err := l.f.act.readUntilRequest(rc, buf, since)
	l.popFetched.Add(int64(n))
	l.f.metrics.Fetched(int64(n), true)
	if err != nil {
		return false, fmt.Errorf("populate bytes %d-%d: %w", g.start, g.end-1, err)
	}
	if n == 0 {
		return false, nil
	}
	if err := l.f.partial.WriteAt(buf[:n], g.start); err != nil {
		return false, fmt.Errorf("populate: %w", err)
	}
	log.G(ctx).WithField("layer", l.desc.Digest).WithField("range", g.start).Trace("populated range")
	return n == len(buf), nil
}
