package extract

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// ErrInvalid is wrapped by every error that means the layer's data is wrong:
// a digest or size mismatch, a corrupt compressed stream or tar, an entry
// that would escape the layer root. errdefs.IsDataLoss reports true for it.
var ErrInvalid error = invalidError{}

// ErrDiffID is wrapped by the error of a blob whose digest matched but
// whose uncompressed tar is not the one the image config names
// (Options.DiffID). Fetching the blob again cannot help: the config is
// wrong. It wraps ErrInvalid.
var ErrDiffID = fmt.Errorf("the image config's diff ID names other content: %w", ErrInvalid)

type invalidError struct{}

func (invalidError) Error() string { return "invalid layer data" }

// DataLoss marks the error for containerd's errdefs.IsDataLoss.
func (invalidError) DataLoss() {}

// Options describe the blob being extracted.
type Options struct {
	// Digest is the digest of the (compressed) blob. Required.
	Digest digest.Digest
	// Size is the blob's size in bytes; 0 skips the size check.
	Size int64
	// DiffID, when set, is the digest the uncompressed tar must have.
	DiffID digest.Digest
	// Parents are the directories of the layers below, topmost first.
	// Directories the tar creates without listing them take their
	// attributes from there, as containerd's applier does.
	Parents []string
	// HideRoot names entries at the root of the layer that are not
	// extracted (eStargz's metadata files). They are still verified.
	HideRoot []string
	// OnEntry, if set, is called with each tar entry that passed the
	// checks, before it is extracted: the entry before it is then
	// complete on disk, attributes included. An error stops extraction
	// and is returned.
	OnEntry func(hdr *tar.Header) error
	// Abort, if set, is called with the error Layer is about to return,
	// while a Read of the source may be under way (it is read ahead in a
	// goroutine): it must make that Read return, by canceling what the
	// source reads from. Layer returns once nothing reads the source, so
	// that the caller may close it; without Abort it waits for such a
	// Read to return by itself.
	Abort func(error)
}

// Result tells what an extraction found.
type Result struct {
	// DiffID is the digest of the uncompressed tar.
	DiffID digest.Digest
	// ImplicitDirs is true when the tar created a directory it did not
	// list; such directories depend on Options.Parents.
	ImplicitDirs bool
}

var (
	magicGzip = []byte{0x1f, 0x8b}
	magicZstd = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// maxZstdWindow is the largest zstd window a layer may declare. A frame
// header of a few bytes makes the decoder allocate its window (twice over),
// and the library accepts up to 512 MiB; 128 MiB is the reference zstd's own
// default limit (ZSTD_WINDOWLOG_LIMIT_DEFAULT), so a frame beyond it needs
// `zstd --long` to decompress anywhere and no image builder writes one.
const maxZstdWindow = 128 << 20

// Layer reads a layer blob from r (gzip, zstd or a plain tar, told apart by
// their magic bytes) and extracts it into dir, which must exist. It reads r
// to its end and verifies the blob before returning; on error dir may hold
// part of the layer and must be discarded by the caller.
func Layer(ctx context.Context, r io.Reader, dir string, opts Options) (Result, error) {
	if err := opts.Digest.Validate(); err != nil {
		return Result{}, fmt.Errorf("layer digest %q: %w", opts.Digest, err)
	}
	blobHash := opts.Digest.Algorithm().Digester()
	raw := &countingReader{r: io.TeeReader(r, blobHash.Hash())}
	br := bufio.NewReaderSize(raw, 1<<20)

	tarStream, closeDecompressor, err := decompress(br)
	if err != nil {
		return Result{}, fmt.Errorf("layer %s: %w", opts.Digest, err)
	}

	diffHash := digest.SHA256.Digester()
	// Reading, hashing and decompressing the blob run a few buffers ahead
	// of creating its files, on another core: one layer's extraction is
	// otherwise one thread (python's 52 MB layer alone: a core for a
	// second, the other idle).
	tarReader := startReadAhead(io.TeeReader(tarStream, diffHash.Hash()), func() error {
		// The digest covers the whole blob, compressed trailer included.
		if _, err := io.Copy(io.Discard, br); err != nil {
			return fmt.Errorf("after the compressed stream: %w", err)
		}
		return nil
	}, closeDecompressor)
	res, err := apply(ctx, dir, tarReader, opts, raw, blobHash, diffHash)
	if err != nil && opts.Abort != nil {
		opts.Abort(err)
	}
	tarReader.stop()
	<-tarReader.finished // r is the caller's again
	return res, err
}

// apply extracts the tar stream tarReader into dir, reads it to its end,
// and then checks what raw read against opts: the blob's size and digest,
// and the tar's digest (see Layer).
func apply(ctx context.Context, dir string, tarReader io.Reader, opts Options, raw *countingReader, blobHash, diffHash digest.Digester) (Result, error) {
	guard := newPathGuard(opts.HideRoot)
	guard.onEntry = opts.OnEntry
	applyOpts := []archive.ApplyOpt{
		archive.WithConvertWhiteout(archive.OverlayConvertWhiteout),
		archive.WithFilter(guard.check),
	}
	if len(opts.Parents) > 0 {
		applyOpts = append(applyOpts, archive.WithParents(opts.Parents))
	}
	if _, err := archive.Apply(ctx, dir, tarReader, applyOpts...); err != nil {
		return Result{}, fmt.Errorf("layer %s: %w", opts.Digest, raw.classify(err))
	}
	// The tar reader stops at the end-of-archive marker; the digests cover
	// the whole stream, padding and compressed trailer included. Once
	// tarReader has returned its end, the read-ahead is done with raw,
	// br and the hashes.
	if _, err := io.Copy(io.Discard, tarReader); err != nil {
		return Result{}, fmt.Errorf("layer %s: after the tar archive: %w", opts.Digest, raw.classify(err))
	}

	if opts.Size > 0 && raw.n != opts.Size {
		return Result{}, fmt.Errorf("layer %s: blob has %d bytes, the manifest says %d: %w", opts.Digest, raw.n, opts.Size, ErrInvalid)
	}
	if got := blobHash.Digest(); got != opts.Digest {
		return Result{}, fmt.Errorf("layer %s: blob bytes have digest %s: %w", opts.Digest, got, ErrInvalid)
	}
	res := Result{DiffID: diffHash.Digest(), ImplicitDirs: guard.implicitDirs}
	if opts.DiffID != "" && res.DiffID != opts.DiffID {
		return Result{}, fmt.Errorf("layer %s: uncompressed tar has digest %s, the image config says %s: %w", opts.Digest, res.DiffID, opts.DiffID, ErrDiffID)
	}
	return res, nil
}

// decompress returns the tar stream inside br.
func decompress(br *bufio.Reader) (io.Reader, func(), error) {
	magic, err := br.Peek(4)
	if err != nil && err != io.EOF {
		return nil, nil, fmt.Errorf("read blob header: %w", err)
	}
	switch {
	case bytes.HasPrefix(magic, magicGzip):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("gzip header: %w: %w", err, ErrInvalid)
		}
		return zr, func() { zr.Close() }, nil
	case bytes.HasPrefix(magic, magicZstd):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxZstdWindow))
		if err != nil {
			return nil, nil, fmt.Errorf("zstd header: %w: %w", err, ErrInvalid)
		}
		return zr, zr.Close, nil
	default:
		return br, func() {}, nil
	}
}

// classify marks an extraction error as ErrInvalid when it can only come
// from bad data. Errors of the source (a registry that went away) and of the
// local system (a full disk) pass through unchanged, so that the caller can
// try another way.
func (c *countingReader) classify(err error) error {
	var errno syscall.Errno
	c.mu.Lock()
	srcErr := c.err
	c.mu.Unlock()
	switch {
	case errors.Is(err, ErrInvalid):
		return err
	case srcErr != nil && srcErr != io.EOF:
		return err
	case errors.As(err, &errno):
		return err
	}
	return fmt.Errorf("%w: %w", err, ErrInvalid)
}

// countingReader counts the bytes read from the source and remembers the
// source's error. The read-ahead's goroutine reads it: err, which classify
// may look at while that goroutine runs, is guarded by mu; n is read once
// the read-ahead has ended.
type countingReader struct {
	r   io.Reader
	n   int64
	mu  sync.Mutex
	err error
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if err != nil {
		c.mu.Lock()
		c.err = err
		c.mu.Unlock()
	}
	return n, err
}
