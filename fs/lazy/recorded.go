package lazy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// Recorded is an io.ReaderAt that keeps the ranges read through it. Open
// reads a layer's footer and TOC through one; saved to disk, it lets Open
// run again after a restart without the registry. What it returns is
// checked again by Open (the TOC digest), so a damaged file is refused.
type Recorded struct {
	src io.ReaderAt // nil once recording is over

	mu     sync.Mutex
	ranges []recordedRange // guarded by mu
}

type recordedRange struct {
	off int64
	b   []byte
}

// ReadAt reads from the recorded ranges, or from the source while
// recording.
func (r *Recorded) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	for _, rg := range r.ranges {
		if off >= rg.off && off+int64(len(p)) <= rg.off+int64(len(rg.b)) {
			n := copy(p, rg.b[off-rg.off:])
			r.mu.Unlock()
			return n, nil
		}
	}
	src := r.src
	r.mu.Unlock()
	if src == nil {
		return 0, fmt.Errorf("bytes %d-%d were not recorded", off, off+int64(len(p))-1)
	}
	n, err := src.ReadAt(p, off)
	if n > 0 {
		r.mu.Lock()
		r.ranges = append(r.ranges, recordedRange{off: off, b: append([]byte(nil), p[:n]...)})
		r.mu.Unlock()
	}
	return n, err
}

// complete reports whether recording is over: r reads nothing more from
// its source.
func (r *Recorded) complete() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.src == nil
}

// Save writes the recorded ranges to path (via a temporary file and a
// rename).
func (r *Recorded) Save(path string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	var hdr [16]byte
	for _, rg := range r.ranges {
		binary.LittleEndian.PutUint64(hdr[:8], uint64(rg.off))
		binary.LittleEndian.PutUint64(hdr[8:], uint64(len(rg.b)))
		if _, err = f.Write(hdr[:]); err == nil {
			_, err = f.Write(rg.b)
		}
		if err != nil {
			break
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save TOC to %s: %w", path, err)
	}
	return nil
}

// maxRecorded bounds what LoadRecorded accepts: footers and TOCs are far
// smaller.
const maxRecorded = 1 << 30

// LoadRecorded reads ranges saved by Save.
func LoadRecorded(path string) (*Recorded, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r := &Recorded{}
	for len(b) > 0 {
		if len(b) < 16 {
			return nil, fmt.Errorf("%s: truncated", path)
		}
		off := int64(binary.LittleEndian.Uint64(b[:8]))
		n := binary.LittleEndian.Uint64(b[8:16])
		b = b[16:]
		if off < 0 || n > maxRecorded || n > uint64(len(b)) {
			return nil, fmt.Errorf("%s: %w", path, errors.New("corrupt range header"))
		}
		r.ranges = append(r.ranges, recordedRange{off: off, b: b[:n:n]})
		b = b[n:]
	}
	return r, nil
}

// maxAhead bounds the bytes a Recorded keeps through add.
const maxAhead = 64 << 20

// add keeps a copy of b, read at off, while the ranges kept stay within
// maxAhead bytes.
func (r *Recorded) add(b []byte, off int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := int64(len(b))
	for _, rg := range r.ranges {
		n += int64(len(rg.b))
	}
	if n > maxAhead {
		return
	}
	r.ranges = append(r.ranges, recordedRange{off: off, b: append([]byte(nil), b...)})
}
