package lazy

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
)

// A layer's TOC is JSON of a few hundred bytes per entry: 17 MB for 50,000
// files. estargz.Open decodes it in one piece, which buffers the whole
// document (growing a buffer by doubling, to 32 MB for those 17 MB) before
// the first entry is decoded: the daemon's peak memory for a lazy image was
// that buffer. openTree decodes the TOC one entry at a time instead and
// builds from the entries the tree the index is made of (see tocTree).
// openStreamed, which hands the entries to estargz's Reader through its
// documented path for a TOC kept outside the blob (a Decompressor whose
// footer says the TOC is elsewhere), is how openTOC did it before: tests
// check that tocTree gives the same index.

// minStreamedTOCOffset is the smallest TOC offset openStreamed handles;
// below it (a blob holding next to nothing before its TOC) estargz.Open
// reads the blob as it always did.
const minStreamedTOCOffset = 64

// errNotStreamed says openStreamed cannot handle the blob and estargz.Open
// should read it.
var errNotStreamed = errors.New("TOC not streamed")

// openStreamed opens the gzip eStargz blob ra of size bytes with its TOC
// decoded as a stream. It reads the footer, then the TOC (with the few
// bytes before it estargz probes) in one request. dec decompresses file
// contents.
func openStreamed(ra io.ReaderAt, size int64, dec estargz.Decompressor) (*estargz.Reader, error) {
	tocOff, err := readTOCRange(ra, size, dec)
	if err != nil {
		return nil, err
	}
	toc := new(estargz.JTOC)
	dgst, err := decodeTOC(dec, io.NewSectionReader(ra, tocOff, size-estargz.FooterSize-tocOff), func(e *estargz.TOCEntry) error {
		toc.Entries = append(toc.Entries, e)
		return nil
	})
	if err != nil {
		return nil, err
	}
	// The blob up to the TOC: its end holds no footer the built-in
	// decompressors accept (and one that parsed by chance would give a
	// TOC whose digest the caller refuses), so estargz turns to
	// streamedTOC, which supplies toc.
	return estargz.Open(io.NewSectionReader(ra, 0, tocOff),
		estargz.WithDecompressors(&streamedTOC{Decompressor: dec, toc: toc, dgst: dgst}))
}

// streamedTOCDigest reads the footer and TOC of the gzip eStargz blob ra as
// openStreamed does and returns the TOC's digest, decoding nothing: what
// ReadTOC needs to record and check them.
func streamedTOCDigest(ra io.ReaderAt, size int64, dec estargz.Decompressor) (digest.Digest, error) {
	tocOff, err := readTOCRange(ra, size, dec)
	if err != nil {
		return "", err
	}
	return decodeTOC(dec, io.NewSectionReader(ra, tocOff, size-estargz.FooterSize-tocOff), nil)
}

// openTree reads the footer and TOC of the gzip eStargz blob ra as
// openStreamed does and builds its tree from the entries as they are
// decoded; it returns the TOC's digest.
func openTree(ra io.ReaderAt, size int64, dec estargz.Decompressor) (*tocTree, digest.Digest, error) {
	tocOff, err := readTOCRange(ra, size, dec)
	if err != nil {
		return nil, "", err
	}
	t := newTOCTree(ra, dec)
	dgst, err := decodeTOC(dec, io.NewSectionReader(ra, tocOff, size-estargz.FooterSize-tocOff), t.add)
	if err != nil {
		return nil, "", err
	}
	if err := t.finish(tocOff); err != nil {
		return nil, "", fmt.Errorf("TOC: %w", err)
	}
	return t, dgst, nil
}

// readTOCRange reads the footer of the gzip eStargz blob ra, then its TOC
// with the few bytes before it that estargz.Open probes (see streamedTOC)
// in one request, and returns the TOC's offset.
func readTOCRange(ra io.ReaderAt, size int64, dec estargz.Decompressor) (int64, error) {
	if size < estargz.FooterSize+minStreamedTOCOffset {
		return 0, errNotStreamed
	}
	footer := make([]byte, estargz.FooterSize)
	if _, err := ra.ReadAt(footer, size-estargz.FooterSize); err != nil {
		return 0, fmt.Errorf("read footer: %w", err)
	}
	_, tocOff, _, err := dec.ParseFooter(footer)
	if err != nil || tocOff < minStreamedTOCOffset || tocOff >= size-estargz.FooterSize {
		return 0, errNotStreamed // legacy stargz, or a footer estargz.Open will judge
	}
	if err := readTail(ra, tocOff-minStreamedTOCOffset, size-estargz.FooterSize); err != nil {
		return 0, fmt.Errorf("read TOC: %w", err)
	}
	return tocOff, nil
}

// decodeTOC decompresses the TOC read from r and, if add is not nil,
// decodes it entry by entry, passing each to add; it returns the digest of
// its JSON bytes (all of them, as the eStargz writer computes it).
func decodeTOC(dec estargz.Decompressor, r io.Reader, add func(*estargz.TOCEntry) error) (digest.Digest, error) {
	tocDec, ok := dec.(interface {
		DecompressTOC(io.Reader) (io.ReadCloser, error)
	})
	if !ok {
		return "", errNotStreamed
	}
	rc, err := tocDec.DecompressTOC(r)
	if err != nil {
		return "", fmt.Errorf("read TOC: %w", err)
	}
	defer rc.Close()
	h := digest.Canonical.Digester()
	tee := io.TeeReader(rc, h.Hash())
	if add != nil {
		if err := decodeJTOC(json.NewDecoder(tee), add); err != nil {
			return "", fmt.Errorf("decode TOC JSON: %w", err)
		}
	}
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return "", fmt.Errorf("read TOC: %w", err)
	}
	return h.Digest(), nil
}

// decodeJTOC decodes the JSON object {"version": n, "entries": [...]}
// one entry at a time, passing each to add; other members are skipped, as
// json.Unmarshal would.
func decodeJTOC(d *json.Decoder, add func(*estargz.TOCEntry) error) error {
	if err := expectDelim(d, '{'); err != nil {
		return err
	}
	for d.More() {
		key, err := d.Token()
		if err != nil {
			return err
		}
		switch key {
		case "version":
			var version int
			err = d.Decode(&version)
		case "entries":
			err = decodeEntries(d, add)
		default:
			var skip json.RawMessage
			err = d.Decode(&skip)
		}
		if err != nil {
			return fmt.Errorf("member %v: %w", key, err)
		}
	}
	return expectDelim(d, '}')
}

func decodeEntries(d *json.Decoder, add func(*estargz.TOCEntry) error) error {
	t, err := d.Token()
	if err != nil {
		return err
	}
	if t == nil { // "entries": null
		return nil
	}
	if t != json.Delim('[') {
		return fmt.Errorf("entries: got %v, want an array", t)
	}
	in := interner{seen: map[string]string{}}
	for i := 0; d.More(); i++ {
		e := new(estargz.TOCEntry)
		if err := d.Decode(e); err != nil {
			return fmt.Errorf("entry %d: %w", i, err)
		}
		// The decoder allocates every string anew: share the ones
		// entries repeat, a fifth of what the entries hold.
		e.Type, e.ModTime3339 = in.get(e.Type), in.get(e.ModTime3339)
		e.Uname, e.Gname = in.get(e.Uname), in.get(e.Gname)
		if e.Digest == e.ChunkDigest {
			e.Digest = e.ChunkDigest // a file of one chunk
		}
		if err := add(e); err != nil {
			return err
		}
	}
	return expectDelim(d, ']')
}

// interner shares equal strings, up to maxInterned distinct ones.
type interner struct {
	seen map[string]string
}

const maxInterned = 4096

func (in interner) get(s string) string {
	if v, ok := in.seen[s]; ok {
		return v
	}
	if len(in.seen) < maxInterned {
		in.seen[s] = s
	}
	return s
}

func expectDelim(d *json.Decoder, want json.Delim) error {
	t, err := d.Token()
	if err != nil {
		return err
	}
	if t != want {
		return fmt.Errorf("got %v, want %v", t, want)
	}
	return nil
}

// streamedTOC is an estargz.Decompressor that supplies a TOC decoded
// beforehand: its footer, of no bytes, says the TOC is not in the blob, so
// estargz.Open asks ParseTOC for it. Contents decompress with the embedded
// Decompressor.
type streamedTOC struct {
	estargz.Decompressor
	toc  *estargz.JTOC
	dgst digest.Digest
}

func (s *streamedTOC) FooterSize() int64 { return 0 }

func (s *streamedTOC) ParseFooter([]byte) (blobPayloadSize, tocOffset, tocSize int64, err error) {
	return -1, -1, 0, nil
}

func (s *streamedTOC) ParseTOC(io.Reader) (*estargz.JTOC, digest.Digest, error) {
	if s.toc == nil {
		return nil, "", errors.New("streamed TOC already used")
	}
	toc := s.toc
	s.toc = nil // estargz keeps it; this one need not
	return toc, s.dgst, nil
}

// gzipDecompressor is estargz's gzip decompressor with its chunk streams
// read by klauspost/compress's gzip, which takes about a third less CPU
// time than the standard library's (python's 52 MB base layer: 0.48-0.49 s
// against 0.68-0.75 s): every lazy read decompresses what it fetches, on
// the path of a starting container.
type gzipDecompressor struct{ estargz.GzipDecompressor }

// Reader returns a reader of the gzip stream r.
func (*gzipDecompressor) Reader(r io.Reader) (io.ReadCloser, error) { return gzip.NewReader(r) }
