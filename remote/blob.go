package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Blob is one blob of one repository, read by byte range. It is safe for
// concurrent use; each reader it returns belongs to one goroutine.
type Blob struct {
	r    *Resolver
	t    target
	desc ocispec.Descriptor
}

// Blob returns a handle for the blob desc of the repository named by ref
// (e.g. "127.0.0.1:5000/foo:latest"; tag and digest in ref are ignored).
// desc.Size must be > 0: it comes from the manifest and bounds every read.
// Blob does no network I/O; fetch errors surface on reads. Invalid arguments
// give errors wrapping errdefs.ErrInvalidArgument.
func (r *Resolver) Blob(ctx context.Context, ref string, desc ocispec.Descriptor) (*Blob, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("blob digest %q in %s: %w: %w", desc.Digest, ref, err, errdefs.ErrInvalidArgument)
	}
	if desc.Size <= 0 {
		return nil, fmt.Errorf("blob %s in %s: size %d, want > 0: %w", desc.Digest, ref, desc.Size, errdefs.ErrInvalidArgument)
	}
	t, err := r.target(ctx, spec, docker.HostCapabilityPull)
	if err != nil {
		return nil, fmt.Errorf("blob %s in %s: %w", desc.Digest, ref, err)
	}
	return &Blob{r: r, t: t, desc: desc}, nil
}

// Size returns the blob's size in bytes, from its descriptor.
func (b *Blob) Size() int64 { return b.desc.Size }

// Digest returns the blob's digest, from its descriptor.
func (b *Blob) Digest() digest.Digest { return b.desc.Digest }

// ReadRange returns a reader of the n bytes at off, fetched with one ranged
// GET. The request is retried on transient errors until it is answered; if it
// cannot be, ReadRange returns an error wrapping ErrUnavailable (ErrNotFound
// if the registry does not have the blob, ErrBadData for a reply with the
// wrong Content-Range). ctx governs the reader's whole
// life: if the body breaks mid-way, the reader requests the remaining bytes
// again, with the same retry budget. From a registry that ignores Range the
// reader discards the bytes before off. The reader returns exactly n bytes
// then io.EOF, or an error wrapping ErrBadData if the registry sends fewer or
// more. The bytes are not verified. Close the reader when done.
func (b *Blob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	if off < 0 || n < 0 || off > b.desc.Size-n {
		return nil, fmt.Errorf("read %s: range of %d bytes at %d is outside its %d bytes: %w",
			b.desc.Digest, n, off, b.desc.Size, errdefs.ErrInvalidArgument)
	}
	if n == 0 {
		return http.NoBody, nil
	}
	rr := &rangeReader{b: b, ctx: ctx, off: off, end: off + n}
	if err := rr.open(); err != nil {
		return nil, err
	}
	return rr, nil
}

// op names a request for bytes [off, end) in error messages.
func (b *Blob) op(off, end int64) op {
	return op{what: "fetch " + b.desc.Digest.String(), detail: fmt.Sprintf(" range %d-%d", off, end-1)}
}

// rangeReader delivers bytes [off, end) of a blob. When a reply body breaks
// before end it requests the remaining bytes again: Options.Retries failures
// are allowed per Options.RangeSize bytes delivered.
type rangeReader struct {
	b      *Blob
	ctx    context.Context
	strict bool // a 200 reply fails with errRangeIgnored instead of being skipped through

	off, end int64 // next byte to deliver; end of the range, exclusive
	reqOff   int64 // first byte asked for by the current request

	body  io.ReadCloser // current reply body; nil before the first and after a failure
	host  string        // the host that sent body
	skip  int64         // bytes of body left before off (a 200 reply)
	whole bool          // body is the whole blob (a 200 reply)

	fails     int   // body failures counted against Options.Retries
	sinceFail int64 // bytes delivered since the last body failure
	err       error // sticky: io.EOF once done, errClosed after Close
}

func (rr *rangeReader) Read(p []byte) (int, error) {
	for rr.err == nil {
		if len(p) == 0 {
			return 0, nil
		}
		if rr.body == nil {
			if err := rr.open(); err != nil {
				rr.err = err
				break
			}
		}
		if rem := rr.end - rr.off; int64(len(p)) > rem {
			p = p[:rem]
		}
		n, err := rr.readBody(p)
		rr.off += int64(n)
		rr.sinceFail += int64(n)
		if rr.off == rr.end {
			rr.err = rr.finish()
			if rr.err == io.EOF {
				return n, nil
			}
			return n, rr.err
		}
		if err == nil {
			if n > 0 {
				return n, nil
			}
			continue
		}
		rr.closeBody()
		rr.err = rr.broken(err)
		if n > 0 {
			return n, nil
		}
	}
	return 0, rr.err
}

// fill reads the whole range into buf, which holds exactly end-off bytes.
func (rr *rangeReader) fill(buf []byte) error {
	for n := 0; ; {
		m, err := rr.Read(buf[n:])
		n += m
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// Close closes the current reply body. Reads after Close fail.
func (rr *rangeReader) Close() error {
	rr.closeBody()
	rr.err = errClosed
	return nil
}

// open requests bytes [off, end) and checks the reply's framing.
func (rr *rangeReader) open() error {
	b := rr.b
	o := b.op(rr.off, rr.end)
	hdr := http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", rr.off, rr.end-1)}}
	resp, host, err := b.r.get(rr.ctx, &b.t, o, "blobs/"+b.desc.Digest.String(), hdr)
	if err != nil {
		return err
	}
	if resp.StatusCode == http.StatusPartialContent {
		err = checkPartial(resp, rr.off, rr.end, b.desc.Size)
		rr.skip, rr.whole = 0, false
	} else { // 200: the registry ignored Range.
		if rr.strict {
			_ = resp.Body.Close()
			return errRangeIgnored
		}
		if resp.ContentLength >= 0 && resp.ContentLength != b.desc.Size {
			err = fmt.Errorf("HTTP 200 with Content-Length %d, want %d", resp.ContentLength, b.desc.Size)
		}
		rr.skip, rr.whole = rr.off, true
	}
	if err != nil {
		_ = resp.Body.Close()
		return newError(o, b.t.repo, host, ErrBadData, err, 1)
	}
	rr.body, rr.host, rr.reqOff = resp.Body, host, rr.off
	return nil
}

// checkPartial checks that a 206 reply carries bytes [off, end) of a blob of
// size bytes.
func checkPartial(resp *http.Response, off, end, size int64) error {
	first, last, total, err := parseContentRange(resp.Header.Get("Content-Range"))
	if err != nil {
		return fmt.Errorf("HTTP 206 with %w", err)
	}
	if first != off || last != end-1 || (total >= 0 && total != size) {
		return fmt.Errorf("HTTP 206 with Content-Range %q, want \"bytes %d-%d/%d\"",
			resp.Header.Get("Content-Range"), off, end-1, size)
	}
	if resp.ContentLength >= 0 && resp.ContentLength != end-off {
		return fmt.Errorf("HTTP 206 with Content-Length %d for %d bytes", resp.ContentLength, end-off)
	}
	return nil
}

// readBody reads from the reply body, first discarding what comes before off.
func (rr *rangeReader) readBody(p []byte) (int, error) {
	if rr.skip > 0 {
		n, err := io.CopyN(io.Discard, rr.body, rr.skip)
		rr.skip -= n
		if err != nil {
			return 0, err
		}
	}
	return rr.body.Read(p)
}

// finish closes the body once the range is delivered and returns io.EOF. A
// body that should end here (a 206 reply, or a 200 reply at the end of the
// blob) but goes on gives ErrBadData.
func (rr *rangeReader) finish() error {
	defer rr.closeBody()
	if rr.whole && rr.end < rr.b.desc.Size {
		return io.EOF
	}
	var one [1]byte
	if n, _ := io.ReadFull(rr.body, one[:]); n > 0 {
		return newError(rr.b.op(rr.reqOff, rr.end), rr.b.t.repo, rr.host, ErrBadData,
			errors.New("reply body longer than requested"), 1)
	}
	return io.EOF
}

// broken handles a body that ended or failed before the range did. It returns
// nil after a backoff when the rest of the range should be requested again.
func (rr *rangeReader) broken(err error) error {
	o := rr.b.op(rr.reqOff, rr.end)
	repo := rr.b.t.repo
	switch {
	case err == io.EOF:
		return newError(o, repo, rr.host, ErrBadData,
			fmt.Errorf("reply body ended %d bytes short", rr.end-(rr.off-rr.skip)), 1)
	case rr.ctx.Err() != nil:
		return fmt.Errorf("%s from %s/%s%s: %w", o.what, rr.host, repo, o.detail, rr.ctx.Err())
	}
	if rr.sinceFail >= rr.b.r.opts.RangeSize {
		rr.fails = 0
	}
	rr.sinceFail = 0
	rr.fails++
	if !isTransient(err) || rr.fails >= rr.b.r.opts.Retries {
		return newError(o, repo, rr.host, ErrUnavailable, fmt.Errorf("read body: %w", err), rr.fails)
	}
	if err := sleep(rr.ctx, backoff(rr.b.r.opts.Backoff, rr.fails)); err != nil {
		return fmt.Errorf("%s from %s/%s%s: %w", o.what, rr.host, repo, o.detail, err)
	}
	return nil
}

func (rr *rangeReader) closeBody() {
	if rr.body != nil {
		_ = rr.body.Close()
		rr.body = nil
	}
}
