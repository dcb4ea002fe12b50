package lazy

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// The exact record: what an eStargz or zstd:chunked TOC cannot say of a
// layer's entries (names and link targets that are not UTF-8, mtimes finer
// than a second), written by `lazylayer convert` as the last tar entry of
// the layer, right before the TOC. See docs/exact-record.md.
const (
	// ExactName is the record's tar entry, at the layer's root. Like
	// stargz.index.json it is never shown in a container.
	ExactName = ".lazylayer.exact.json"
	// ExactDigestAnnotation is the layer annotation holding the digest of
	// the record's bytes; a record is used only when it matches.
	ExactDigestAnnotation = "io.lazylayer.exact.digest"
	// ExactOffsetAnnotation is the layer annotation holding the blob
	// offset where the record's compressed bytes start: the daemon reads
	// from there to the end of the blob (record, TOC, footer) at once.
	ExactOffsetAnnotation = "io.lazylayer.exact.offset"

	// maxExactTail bounds the bytes read at once from the record's
	// offset to the blob's end.
	maxExactTail = 256 << 20
	exactVersion = 1
)

// FormatNames are the entries eStargz, zstd:chunked and lazylayer add at a
// layer's root for their own use: not part of the image's file system, so
// neither a lazy view nor a local tree shows them.
func FormatNames() []string {
	return []string{estargz.PrefetchLandmark, estargz.NoPrefetchLandmark, estargz.TOCTarName, ExactName}
}

// exactRecord is the record's JSON.
type exactRecord struct {
	Version int          `json:"version"`
	Entries []exactEntry `json:"entries"`
}

// exactEntry is one tar entry the TOC cannot describe exactly: only what
// differs from the TOC is set.
type exactEntry struct {
	TOC   string `json:"t"`           // the entry's name as the TOC has it
	Name  []byte `json:"n,omitempty"` // raw name bytes, when not what TOC says
	Link  []byte `json:"l,omitempty"` // raw link target, when not what TOC says
	Mtime int64  `json:"m,omitempty"` // mtime in ns, when it has a fraction of a second
}

// tocString is s as a TOC (JSON) carries it: every byte that is not
// UTF-8 becomes U+FFFD.
func tocString(s string) string {
	b, _ := json.Marshal(s)
	var out string
	_ = json.Unmarshal(b, &out)
	return out
}

// tocName is the name the TOC gives tar name n.
func tocName(n string) string {
	return strings.TrimPrefix(path.Clean("/"+tocString(n)), "/")
}

// ExactRecorder builds the exact record of a tar, entry by entry.
type ExactRecorder struct {
	rec exactRecord
	raw map[string]string // TOC name → raw name, cleaned
	err error
}

// Add notes the tar entry hdr. Two names the tar tells apart that become
// one in a TOC make the record impossible: no record can then make the
// lazy view exact, and Record says so.
func (x *ExactRecorder) Add(hdr *tar.Header) {
	if x.raw == nil {
		x.raw = map[string]string{}
	}
	tn := tocName(hdr.Name)
	cleanRaw := strings.TrimPrefix(path.Clean("/"+hdr.Name), "/")
	r, seen := x.raw[tn]
	if seen && r != cleanRaw && x.err == nil {
		x.err = fmt.Errorf("tar names %q and %q are both %q in a TOC", r, cleanRaw, tn)
	}
	x.raw[tn] = cleanRaw
	e := exactEntry{TOC: tn}
	if cleanRaw != tn {
		e.Name = []byte(cleanRaw)
	}
	if (hdr.Typeflag == tar.TypeSymlink || hdr.Typeflag == tar.TypeLink) && tocString(hdr.Linkname) != hdr.Linkname {
		e.Link = []byte(hdr.Linkname)
	}
	if hdr.ModTime.Nanosecond() != 0 && hdr.ModTime.Unix() != 0 {
		e.Mtime = hdr.ModTime.UnixNano()
	}
	// A name seen before gets an entry in any case: the last one wins.
	if e.Name != nil || e.Link != nil || e.Mtime != 0 || seen {
		x.rec.Entries = append(x.rec.Entries, e)
	}
}

// Record returns the record (JSON) of the entries added. A layer whose TOC
// says everything exactly gets a record without entries: it says so.
func (x *ExactRecorder) Record() ([]byte, error) {
	if x.err != nil {
		return nil, x.err
	}
	x.rec.Version = exactVersion
	if x.rec.Entries == nil {
		x.rec.Entries = []exactEntry{}
	}
	return json.Marshal(x.rec)
}

// ExactAnnotations returns the layer annotations for record, whose
// compressed bytes start at blob offset off.
func ExactAnnotations(record []byte, off int64) map[string]string {
	return map[string]string{
		ExactDigestAnnotation: digest.FromBytes(record).String(),
		ExactOffsetAnnotation: strconv.FormatInt(off, 10),
	}
}

// exactOffset returns where desc's record starts in its blob, when desc
// announces a record.
func exactOffset(desc ocispec.Descriptor) (int64, digest.Digest, bool) {
	d, err := digest.Parse(desc.Annotations[ExactDigestAnnotation])
	if err != nil {
		return 0, "", false
	}
	off, err := strconv.ParseInt(desc.Annotations[ExactOffsetAnnotation], 10, 64)
	if err != nil || off <= 0 || off >= desc.Size || desc.Size-off > maxExactTail {
		return 0, "", false
	}
	return off, d, true
}

// exactInfo is what the index takes from a verified record, by TOC name.
type exactInfo struct {
	name  string // raw base name, "" when the TOC's is right
	link  string // raw link target, "" when the TOC's is right
	mtime int64  // ns, 0 when the TOC's is right
}

// readExact reads the record entry of r, checks its bytes against want and
// parses it. It reads through r, which serves the bytes already read with
// the TOC when the offset annotation is right.
func readExact[K comparable](r tocSource[K], want digest.Digest, off int64) (map[string]*exactInfo, error) {
	k, ok := r.lookup(ExactName)
	if !ok || r.entry(k).Type != "reg" {
		return nil, fmt.Errorf("the layer has no %s entry", ExactName)
	}
	te := r.entry(k)
	if te.Offset < off {
		return nil, fmt.Errorf("%s starts at %d, the annotation says %d", ExactName, te.Offset, off)
	}
	if te.Size < 0 || te.Size > maxExactTail {
		return nil, fmt.Errorf("%s has %d bytes", ExactName, te.Size)
	}
	b, err := r.readFile(ExactName, te.Size)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", ExactName, err)
	}
	if got := want.Algorithm().FromBytes(b); got != want {
		return nil, fmt.Errorf("%s has digest %s, the manifest says %s: %w", ExactName, got, want, errExactDigest)
	}
	var rec exactRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("%s: %w", ExactName, err)
	}
	if rec.Version != exactVersion {
		return nil, fmt.Errorf("%s: version %d, want %d", ExactName, rec.Version, exactVersion)
	}
	out := make(map[string]*exactInfo, len(rec.Entries))
	for _, e := range rec.Entries {
		k, ok := r.lookup(e.TOC)
		if !ok {
			return nil, fmt.Errorf("%s: %q is not in the TOC", ExactName, e.TOC)
		}
		te := r.entry(k)
		x := &exactInfo{mtime: e.Mtime}
		if e.Name != nil {
			if tocName(string(e.Name)) != e.TOC {
				return nil, fmt.Errorf("%s: name %q is not the TOC's %q", ExactName, e.Name, e.TOC)
			}
			x.name = path.Base(string(e.Name))
		}
		if e.Link != nil {
			if te.Type == "symlink" && tocString(string(e.Link)) != te.LinkName {
				return nil, fmt.Errorf("%s: %q: link %q is not the TOC's %q", ExactName, e.TOC, e.Link, te.LinkName)
			}
			x.link = string(e.Link)
		}
		if e.Mtime != 0 {
			mt := time.Unix(0, e.Mtime)
			if tm := te.ModTime; !mt.Round(time.Second).Equal(tm) && !(tm.IsZero() && mt.Unix() == 0) {
				return nil, fmt.Errorf("%s: %q: mtime %s, the TOC says %s", ExactName, e.TOC, mt.UTC(), tm.UTC())
			}
		}
		out[e.TOC] = x
	}
	return out, nil
}

// errExactDigest is wrapped when a record does not have the digest the
// manifest gives.
var errExactDigest = fmt.Errorf("exact record does not match its digest")

// readTail reads the blob's bytes from off to size through rec in one
// request.
func readTail(rec io.ReaderAt, off, size int64) error {
	b := make([]byte, size-off)
	n, err := rec.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return err
}
