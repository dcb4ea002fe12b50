package lazy

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"sync"
	"time"
)

// partialBlob is a local copy of a layer blob that fills in as ranges
// arrive, from on-demand reads and from population alike, so that no byte
// is fetched twice. Which ranges it holds is saved next to it each time it
// changes, so that a daemon that dies loses none of it; after a machine
// crash the saved list may claim bytes that never reached the disk, which
// the whole-blob digest check catches.
type partialBlob struct {
	path string
	size int64

	// saveMu is held to change have, from saving the new list until it is
	// in place, and to close or remove the copy.
	saveMu sync.Mutex
	gone   bool // closed or removed: the list is saved no more; guarded by saveMu

	mu    sync.Mutex
	f     *os.File      // guarded by mu for Close; WriteAt/ReadAt are safe concurrently
	have  []span        // sorted, disjoint, not adjacent; guarded by mu, and by saveMu to change
	added chan struct{} // closed and replaced when the ranges change; guarded by mu
	// The last write failure and when to try writing again, nil once a
	// write worked; guarded by mu.
	writeErr error
	retryAt  time.Time
}

// writeRetry is how long the copy refuses writes after one failed: a full
// disk does not clear in a moment, and population should not fetch bytes it
// cannot keep.
const writeRetry = 30 * time.Second

// span is the byte range [start, end).
type span struct{ start, end int64 }

func (s span) len() int64 { return s.end - s.start }

// openPartial opens (or creates) the partial blob at path for a blob of
// size bytes, with the list of ranges it holds from path+".ranges".
func openPartial(path string, size int64) (*partialBlob, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, err
	}
	p := &partialBlob{path: path, size: size, f: f, added: make(chan struct{})}
	if b, err := os.ReadFile(path + ".ranges"); err == nil {
		for ; len(b) >= 16; b = b[16:] {
			s := span{int64(binary.LittleEndian.Uint64(b)), int64(binary.LittleEndian.Uint64(b[8:]))}
			if s.start >= 0 && s.start < s.end && s.end <= size {
				p.have = withSpan(p.have, s)
			}
		}
	}
	return p, nil
}

// WriteAt stores b at off and records the range. For writeRetry after a
// write failed, it fails at once with an error wrapping that failure.
func (p *partialBlob) WriteAt(b []byte, off int64) error {
	if off < 0 || off+int64(len(b)) > p.size {
		return fmt.Errorf("partial blob: range %d+%d outside %d bytes", off, len(b), p.size)
	}
	if err := p.writable(); err != nil {
		return err
	}
	if _, err := p.f.WriteAt(b, off); err != nil {
		p.mu.Lock()
		p.writeErr, p.retryAt = err, time.Now().Add(writeRetry)
		p.mu.Unlock()
		return err
	}
	p.mu.Lock()
	p.writeErr = nil
	p.mu.Unlock()
	p.change(func(have []span) []span { return withSpan(have, span{off, off + int64(len(b))}) })
	return nil
}

// change replaces the held ranges with what edit makes of a copy of them,
// saving the new list before it takes effect: a range counts as held only
// once the list on disk says so, and a daemon that dies loses nothing it
// counted. A list that cannot be saved (a full disk) takes effect all the
// same; the next change or close saves it, and close reports the failure.
func (p *partialBlob) change(edit func([]span) []span) {
	p.saveMu.Lock()
	defer p.saveMu.Unlock()
	p.mu.Lock()
	have := edit(slices.Clone(p.have))
	p.mu.Unlock()
	_ = p.writeList(have)
	p.mu.Lock()
	p.have = have
	close(p.added)
	p.added = make(chan struct{})
	p.mu.Unlock()
}

// writable returns nil unless a write failed within writeRetry, and then an
// error wrapping that failure.
func (p *partialBlob) writable() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.writeErr != nil && time.Now().Before(p.retryAt) {
		return fmt.Errorf("not writing until %s: %w", p.retryAt.Format(time.TimeOnly), p.writeErr)
	}
	return nil
}

// withSpan merges s into have, which it may modify, and returns the result.
func withSpan(have []span, s span) []span {
	i := sort.Search(len(have), func(i int) bool { return have[i].end >= s.start })
	j := i
	for j < len(have) && have[j].start <= s.end {
		s.start = min(s.start, have[j].start)
		s.end = max(s.end, have[j].end)
		j++
	}
	return append(have[:i], append([]span{s}, have[j:]...)...)
}

// forget drops s from the held ranges: its bytes proved wrong.
func (p *partialBlob) forget(s span) {
	p.change(func(have []span) []span { return without(have, s) })
}

// without returns have less s.
func without(have []span, s span) []span {
	var out []span
	for _, h := range have {
		if h.end <= s.start || h.start >= s.end {
			out = append(out, h)
			continue
		}
		if h.start < s.start {
			out = append(out, span{h.start, s.start})
		}
		if h.end > s.end {
			out = append(out, span{s.end, h.end})
		}
	}
	return out
}

// missing returns the ranges not yet held, each at most max bytes.
func (p *partialBlob) missing(max int64) []span {
	return p.missingIn(span{0, p.size}, max)
}

// missingIn returns the ranges of s not yet held, each at most max bytes.
func (p *partialBlob) missingIn(s span, max int64) []span {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []span
	emit := func(g span) {
		for g.start < g.end {
			e := min(g.end, g.start+max)
			out = append(out, span{g.start, e})
			g.start = e
		}
	}
	pos := s.start
	for _, h := range p.have {
		if h.end <= pos {
			continue
		}
		if h.start >= s.end {
			break
		}
		if h.start > pos {
			emit(span{pos, h.start})
		}
		pos = h.end
	}
	if pos < s.end {
		emit(span{pos, s.end})
	}
	return out
}

// held returns how many bytes are held.
func (p *partialBlob) held() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := int64(0)
	for _, h := range p.have {
		n += h.len()
	}
	return n
}

// has reports whether all of s is held.
func (p *partialBlob) has(s span) bool {
	n, _ := p.heldAt(s.start)
	return n >= s.len()
}

// heldAt returns how many bytes from off on are held without a gap, and a
// channel that is closed when the held ranges change.
func (p *partialBlob) heldAt(off int64) (int64, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	i := sort.Search(len(p.have), func(i int) bool { return p.have[i].end > off })
	if i < len(p.have) && p.have[i].start <= off {
		return p.have[i].end - off, p.added
	}
	return 0, p.added
}

// follow reads the whole blob from the local copy in order, waiting for
// each byte to arrive, so that a download and a reader of its result can
// run at the same time. Its reads fail with ctx's cause once ctx is done.
func (p *partialBlob) follow(ctx context.Context) io.Reader {
	return &follower{p: p, ctx: ctx}
}

type follower struct {
	p   *partialBlob
	ctx context.Context
	off int64
}

func (r *follower) Read(b []byte) (int, error) {
	if r.off >= r.p.size {
		return 0, io.EOF
	}
	for {
		n, added := r.p.heldAt(r.off)
		if n > 0 {
			n, err := r.p.f.ReadAt(b[:min(int64(len(b)), n)], r.off)
			r.off += int64(n)
			if err == io.EOF && r.off < r.p.size {
				err = io.ErrUnexpectedEOF
			}
			return n, err
		}
		select {
		case <-added:
		case <-r.ctx.Done():
			return 0, context.Cause(r.ctx)
		}
	}
}

// save writes the list of held ranges.
func (p *partialBlob) save() error {
	p.saveMu.Lock()
	defer p.saveMu.Unlock()
	return p.saveLocked()
}

// saveLocked writes the list of held ranges. Caller holds saveMu.
func (p *partialBlob) saveLocked() error {
	p.mu.Lock()
	have := p.have
	p.mu.Unlock()
	return p.writeList(have)
}

// writeList writes have as the list of held ranges, unless the copy is
// closed or removed. Caller holds saveMu.
func (p *partialBlob) writeList(have []span) error {
	if p.gone {
		return nil
	}
	b := make([]byte, 0, 16*len(have))
	for _, h := range have {
		b = binary.LittleEndian.AppendUint64(b, uint64(h.start))
		b = binary.LittleEndian.AppendUint64(b, uint64(h.end))
	}
	tmp := p.path + ".ranges.tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p.path+".ranges")
}

// reset forgets everything held (after a failed digest check).
func (p *partialBlob) reset() {
	p.change(func([]span) []span { return nil })
}

// remove closes and deletes the partial blob and its range list.
func (p *partialBlob) remove() error {
	p.saveMu.Lock()
	defer p.saveMu.Unlock()
	p.gone = true
	p.mu.Lock()
	defer p.mu.Unlock()
	p.f.Close()
	os.Remove(p.path + ".ranges")
	return os.Remove(p.path)
}

// close saves the list of held ranges and closes the copy.
func (p *partialBlob) close() error {
	p.saveMu.Lock()
	defer p.saveMu.Unlock()
	err := p.saveLocked()
	p.gone = true
	p.mu.Lock()
	defer p.mu.Unlock()
	if cerr := p.f.Close(); err == nil {
		err = cerr
	}
	return err
}
