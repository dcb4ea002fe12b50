package remote

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
)

// Stream returns the whole blob, in order. It fetches up to
// Options.Concurrency ranges of Options.RangeSize bytes in parallel, into
// buffers shared by all the Resolver's streams (Concurrency of them), so
// all streams together hold at most about Concurrency*RangeSize bytes;
// each range is retried and resumed on its own. If the registry ignores Range (answers 200 with the
// whole blob), Stream falls back to reading that single reply.
//
// The reader returns exactly Size bytes then io.EOF. It does not verify the
// digest (the caller does), but a registry that sends fewer or more bytes than
// the descriptor's size, or a Content-Range other than the one asked for,
// gives an error wrapping ErrBadData; bytes that cannot be fetched give one
// wrapping ErrUnavailable (ErrNotFound if the registry does not have the
// blob). Canceling ctx stops the stream. Close must be
// called, and not while a Read is in progress; it stops every fetch and
// returns once no goroutine of the stream is left.
func (b *Blob) Stream(ctx context.Context) io.ReadCloser {
	ctx, cancel := context.WithCancel(ctx)
	work, stopWork := context.WithCancel(ctx)
	c := b.r.opts.Concurrency
	s := &stream{
		b:        b,
		ctx:      ctx,
		cancel:   cancel,
		stopWork: stopWork,
		parts:    make(chan *part, c),
		slots:    make(chan struct{}, c),
	}
	for range c {
		s.slots <- struct{}{}
	}
	b.r.streams.Add(1)
	s.wg.Add(1)
	go s.produce(work)
	return s
}

// part is one range of a stream, fetched by its own goroutine.
type part struct {
	off, end int64
	buf      []byte        // end-off bytes, filled by the fetcher
	err      error         // set by the fetcher before done is closed
	done     chan struct{} // closed when the fetcher is finished
}

// stream is the reader Stream returns. The producer starts a fetcher per part
// once it has a slot (one of Concurrency) and a buffer from the Resolver's
// shared ones, in blob order, and queues the part; Read takes parts off the
// queue in order and gives their slots and buffers back when it has delivered
// them. A stream's oldest part always holds a buffer, so every stream makes
// progress however many share the buffers; Close gives back the buffers of
// the parts it did not deliver.
type stream struct {
	b        *Blob
	ctx      context.Context    // canceled by Close
	cancel   context.CancelFunc // cancels ctx
	stopWork context.CancelFunc // cancels the producer's and fetchers' context
	parts    chan *part         // parts started, in blob order; closed by the producer
	slots    chan struct{}      // free slots: Concurrency of them in all
	failed   atomic.Bool        // a fetch failed: start no more parts
	wg       sync.WaitGroup     // the producer and fetchers

	// Used by Read and Close only.
	cur   *part        // part being delivered
	taken *part        // part off the queue, not yet current (its fetch may still run)
	pos   int          // next byte of cur.buf to deliver
	off   int64        // bytes delivered
	whole *rangeReader // the single reply read after the registry ignored Range
	err   error        // sticky
}

// produce starts a fetcher for each range, in order, as buffers come free.
func (s *stream) produce(ctx context.Context) {
	defer s.wg.Done()
	defer close(s.parts)
	size, step := s.b.desc.Size, s.b.r.opts.RangeSize
	for off := int64(0); off < size && !s.failed.Load(); off += step {
		select {
		case <-s.slots:
		case <-ctx.Done():
			return
		}
		var buf []byte
		select {
		case buf = <-s.b.r.bufs:
		case <-ctx.Done():
			return
		}
		end := min(off+step, size)
		if int64(cap(buf)) < end-off {
			// Pages of a mapped buffer a small blob leaves untouched
			// take no memory.
			freeRangeBuf(buf)
			buf = newRangeBuf(int(step))
		}
		p := &part{off: off, end: end, buf: buf[:end-off], done: make(chan struct{})}
		s.wg.Add(1)
		go s.fetch(ctx, p)
		s.parts <- p // never blocks: at most Concurrency parts hold slots
	}
}

// fetch fills p with its range.
func (s *stream) fetch(ctx context.Context, p *part) {
	defer s.wg.Done()
	defer close(p.done)
	rr := &rangeReader{b: s.b, ctx: ctx, off: p.off, end: p.end, strict: true}
	p.err = rr.fill(p.buf)
	_ = rr.Close()
	if p.err != nil {
		s.failed.Store(true)
	}
}

func (s *stream) Read(p []byte) (int, error) {
	for s.err == nil {
		if s.whole != nil {
			n, err := s.whole.Read(p)
			s.off += int64(n)
			s.err = err
			return n, err
		}
		if s.cur != nil && s.pos < len(s.cur.buf) {
			n := copy(p, s.cur.buf[s.pos:])
			s.pos += n
			s.off += int64(n)
			return n, nil
		}
		if s.cur != nil {
			s.release(s.cur)
			s.cur = nil
		}
		if s.off == s.b.desc.Size {
			s.err = io.EOF
			break
		}
		s.err = s.next()
	}
	return 0, s.err
}

// next waits for the next part and makes it current, or switches to a single
// reply if the registry ignored Range.
func (s *stream) next() error {
	var p *part
	select {
	case p = <-s.parts:
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
	if p == nil {
		// The producer stops early only after a failure, which Read meets
		// before the end of the queue.
		return errors.New("remote: stream ended early")
	}
	s.taken = p // its fetch may still write its buffer: Close gives it back
	select {
	case <-p.done:
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
	s.taken = nil
	switch {
	case errors.Is(p.err, errRangeIgnored):
		s.release(p)
		s.stopWork()
		s.wg.Wait()
		s.releaseQueued()
		s.whole = &rangeReader{b: s.b, ctx: s.ctx, off: s.off, end: s.b.desc.Size}
		return nil
	case p.err != nil:
		s.release(p)
		return p.err
	}
	s.cur, s.pos = p, 0
	return nil
}

// release gives p's slot and buffer back. p's fetch has ended.
func (s *stream) release(p *part) {
	s.b.r.bufs <- p.buf[:cap(p.buf)]
	s.slots <- struct{}{}
}

// releaseQueued releases the parts left in the queue. The producer and
// the fetchers have returned.
func (s *stream) releaseQueued() {
	for p := range s.parts {
		s.release(p)
	}
}

// Close stops every fetch and waits for the stream's goroutines to return.
func (s *stream) Close() error {
	if s.err == errClosed {
		return nil
	}
	s.cancel()
	s.wg.Wait()
	if s.whole != nil {
		_ = s.whole.Close()
	}
	for _, p := range []*part{s.cur, s.taken} {
		if p != nil {
			s.release(p)
		}
	}
	s.cur, s.taken = nil, nil
	s.releaseQueued()
	s.err = errClosed
	if s.b.r.streams.Add(-1) == 0 {
		s.b.r.dropBuffers()
	}
	return nil
}

// dropBuffers frees the free buffers and puts nil in their place once no
// stream is open; the next streams allocate them again. A stream opened
// meanwhile may take a buffer first: then fewer are dropped.
func (r *Resolver) dropBuffers() {
	var taken [][]byte
	for range cap(r.bufs) {
		select {
		case b := <-r.bufs:
			taken = append(taken, b)
		default:
		}
	}
	for range taken {
		r.bufs <- nil
	}
	for _, b := range taken {
		freeRangeBuf(b)
	}
}
