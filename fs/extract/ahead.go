package extract

import (
	"io"
	"sync"
)

// A readAhead reads its source in a goroutine of its own, up to
// aheadBuffers buffers ahead of its reader, so that producing a stream
// (fetching, hashing, decompressing) and consuming it (creating files)
// use two cores. Its buffers come from a pool shared by all extractions.
const (
	aheadBuffers = 4
	aheadBuffer  = 64 << 10
)

var aheadPool = sync.Pool{New: func() any { return new([aheadBuffer]byte) }}

type readAhead struct {
	full     chan aheadPiece
	free     chan *[aheadBuffer]byte
	done     chan struct{}
	finished chan struct{} // closed when the goroutine has returned, after finally
	once     sync.Once

	cur []byte             // the unread part of buf
	buf *[aheadBuffer]byte // being read; returned to free when read
	err error              // after cur: the source's end or error
}

// aheadPiece is a buffer the goroutine filled: n bytes, then err.
type aheadPiece struct {
	buf *[aheadBuffer]byte
	n   int
	err error
}

// startReadAhead reads r ahead until its end or error; at its end it calls
// then, whose error (or io.EOF) is the stream's end. The goroutine calls
// finally as it returns: what r reads from is its own until then. Call
// stop once done reading, even after the end: the goroutine then returns
// as soon as its source's Read does.
func startReadAhead(r io.Reader, then func() error, finally func()) *readAhead {
	a := &readAhead{
		full:     make(chan aheadPiece, aheadBuffers),
		free:     make(chan *[aheadBuffer]byte, aheadBuffers),
		done:     make(chan struct{}),
		finished: make(chan struct{}),
	}
	for range aheadBuffers {
		a.free <- aheadPool.Get().(*[aheadBuffer]byte)
	}
	go func() {
		defer close(a.finished)
		defer finally()
		a.run(r, then)
	}()
	return a
}

func (a *readAhead) run(r io.Reader, then func() error) {
	for {
		var buf *[aheadBuffer]byte
		select {
		case buf = <-a.free:
		case <-a.done:
			return
		}
		// What r has is passed on at once: a source that follows a
		// download must not wait for a buffer's worth.
		n, err := 0, error(nil)
		for n == 0 && err == nil {
			n, err = r.Read(buf[:])
		}
		if err == io.EOF {
			if err = then(); err == nil {
				err = io.EOF
			}
		}
		select {
		case a.full <- aheadPiece{buf, n, err}:
		case <-a.done:
			aheadPool.Put(buf)
			return
		}
		if err != nil {
			return
		}
	}
}

// Read implements io.Reader. It is not safe for concurrent use.
func (a *readAhead) Read(p []byte) (int, error) {
	for len(a.cur) == 0 {
		if a.buf != nil {
			a.free <- a.buf // it came from free, which has room for it
			a.buf = nil
		}
		if a.err != nil {
			return 0, a.err
		}
		piece := <-a.full
		a.buf, a.cur, a.err = piece.buf, piece.buf[:piece.n], piece.err
	}
	n := copy(p, a.cur)
	a.cur = a.cur[n:]
	return n, nil
}

// stop ends the goroutine (at once unless it is in its source's Read) and
// returns the buffers it no longer uses to the pool.
func (a *readAhead) stop() {
	a.once.Do(func() {
		close(a.done)
		if a.buf != nil {
			aheadPool.Put(a.buf)
			a.buf = nil
		}
		for {
			select {
			case buf := <-a.free:
				aheadPool.Put(buf)
			case piece := <-a.full:
				aheadPool.Put(piece.buf)
			default:
				return
			}
		}
	})
}
