package remote

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
)

// Stream returns the whole blob, in order. It fetches up to
// Options.Concurrency ranges of Options.RangeSize bytes in parallel, so it
// holds at most about Concurrency*RangeSize bytes; each range is retried and
// resumed on its own. If the registry ignores Range (answers 200 with the
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
		buffers:  make(chan []byte, c),
	}
	for range c {
		s.buffers <- nil // allocated on first use
	}
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
// once a buffer is free and queues the part; Read takes parts off the queue in
// order and gives their buffers back when it has delivered them.
type stream struct {
	b        *Blob
	ctx      context.Context    // canceled by Close
	cancel   context.CancelFunc // cancels ctx
	stopWork context.CancelFunc // cancels the producer's and fetchers' context
	parts    chan *part         // parts started, in blob order; closed by the producer
	buffers  chan []byte        // free buffers: Concurrency of them in all
	failed   atomic.Bool        // a fetch failed: start no more parts
	wg       sync.WaitGroup     // the producer and fetchers

	// Used by Read and Close only.
	cur   *part        // part being delivered
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
		var buf []byte
		select {
		case buf = <-s.buffers:
		case <-ctx.Done():
			return
		}
		end := min(off+step, size)
		if buf == nil {
			buf = make([]byte, min(step, size))
		}
		p := &part{off: off, end: end, buf: buf[:end-off], done: make(chan struct{})}
		s.wg.Add(1)
		go s.fetch(ctx, p)
		s.parts <- p // never blocks: at most Concurrency parts hold buffers
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
			s.buffers <- s.cur.buf[:cap(s.cur.buf)]
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
	select {
	case <-p.done:
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
	switch {
	case errors.Is(p.err, errRangeIgnored):
		s.stopWork()
		s.wg.Wait()
		s.whole = &rangeReader{b: s.b, ctx: s.ctx, off: s.off, end: s.b.desc.Size}
		return nil
	case p.err != nil:
		return p.err
	}
	s.cur, s.pos = p, 0
	return nil
}

// Close stops every fetch and waits for the stream's goroutines to return.
func (s *stream) Close() error {
	s.cancel()
	s.wg.Wait()
	if s.whole != nil {
		_ = s.whole.Close()
	}
	s.err = errClosed
	return nil
}
