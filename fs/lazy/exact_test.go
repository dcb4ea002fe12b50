package lazy

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/cache"
)

// exactEntries is a layer whose TOC cannot say everything: names and a
// link target that are not UTF-8, sub-second mtimes; and what extraction
// decides: a name whited out and created again, user.* xattrs on a
// symlink and a fifo, trusted.* xattrs.
func exactEntries() []tarEntry {
	t0 := time.Unix(1700000000, 0)
	return []tarEntry{
		{hdr: tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: t0.Add(250 * time.Millisecond),
			PAXRecords: map[string]string{"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.d": "1"}}},
		{hdr: tar.Header{Name: "d/caf\xe9", Typeflag: tar.TypeReg, Mode: 0o644, ModTime: t0.Add(123456789)}, body: []byte("latin-1\n")},
		{hdr: tar.Header{Name: "d/\xff\xfe", Typeflag: tar.TypeReg, Mode: 0o644, ModTime: t0.Add(600 * time.Millisecond),
			PAXRecords: map[string]string{"SCHILY.xattr.trusted.x": "t", "SCHILY.xattr.user.x": "u"}}, body: []byte("invalid\n")},
		{hdr: tar.Header{Name: "d/link", Typeflag: tar.TypeSymlink, Linkname: "caf\xe9", ModTime: t0.Add(999999999),
			PAXRecords: map[string]string{"SCHILY.xattr.user.l": "on a symlink"}}},
		{hdr: tar.Header{Name: "d/fifo", Typeflag: tar.TypeFifo, Mode: 0o644, ModTime: t0,
			PAXRecords: map[string]string{"SCHILY.xattr.user.f": "on a fifo"}}},
		{hdr: tar.Header{Name: "d/.wh.again", Typeflag: tar.TypeReg, ModTime: t0}},
		{hdr: tar.Header{Name: "d/again", Typeflag: tar.TypeReg, Mode: 0o600, ModTime: t0.Add(1)}, body: []byte("created after its whiteout\n")},
	}
}

// exactBlob builds the eStargz blob of entries as lazylayer convert does:
// with the exact record last. mangle, if set, changes the record before it
// is written (the annotation digest is of what is written).
func exactBlob(t *testing.T, entries []tarEntry, mangle func([]byte) []byte) ([]byte, ocispec.Descriptor) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	var x ExactRecorder
	for _, e := range entries {
		e.hdr.Size = int64(len(e.body))
		e.hdr.Format = tar.FormatPAX
		x.Add(&e.hdr)
		if err := tw.WriteHeader(&e.hdr); err != nil {
			t.Fatal(err)
		}
		tw.Write(e.body)
	}
	record, err := x.Record()
	if err != nil || record == nil {
		t.Fatalf("record: %v (%d bytes)", err, len(record))
	}
	if mangle != nil {
		record = mangle(record)
	}
	tw.WriteHeader(&tar.Header{Name: ExactName, Typeflag: tar.TypeReg, Mode: 0o444, Size: int64(len(record)), Format: tar.FormatPAX})
	tw.Write(record)
	tw.Close()
	rc, err := estargz.Build(io.NewSectionReader(bytes.NewReader(buf.Bytes()), 0, int64(buf.Len())))
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	blob, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	r, err := estargz.Open(io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob))))
	if err != nil {
		t.Fatal(err)
	}
	e, ok := r.Lookup(ExactName)
	if !ok {
		t.Fatalf("built layer has no %s", ExactName)
	}
	desc := ocispec.Descriptor{
		MediaType:   ocispec.MediaTypeImageLayerGzip,
		Digest:      digest.FromBytes(blob),
		Size:        int64(len(blob)),
		Annotations: ExactAnnotations(record, e.Offset),
	}
	desc.Annotations[TOCDigestAnnotation] = rc.TOCDigest().String()
	return blob, desc
}

// countingReaderAt counts the reads made through it: each is a request to
// the registry.
type countingReaderAt struct {
	r     io.ReaderAt
	reads atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.r.ReadAt(p, off)
}

func openExact(t *testing.T, blob []byte, desc ocispec.Descriptor) (*Layer, int64) {
	t.Helper()
	c, err := cache.Open(context.Background(), t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ra := &countingReaderAt{r: bytes.NewReader(blob)}
	tocDigest, _ := Capable(desc)
	l, err := Open(context.Background(), ra, &testBlob{data: blob}, desc, tocDigest, Options{Cache: c})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, ra.reads.Load()
}

// TestExactRecord: with its exact record, a lazy layer shows raw names,
// link targets and nanosecond mtimes, read with the footer and TOC in one
// request; and it takes extraction's decisions.
func TestExactRecord(t *testing.T) {
	blob, desc := exactBlob(t, exactEntries(), nil)
	l, reads := openExact(t, blob, desc)
	if reads != 1 {
		t.Errorf("opening the layer made %d reads, want 1 (record, TOC and footer at once)", reads)
	}
	if l.View() != ViewExact {
		t.Fatalf("view: %s", l.View())
	}
	mnt := mountLayer(t, l)
	var names []string
	ents, err := os.ReadDir(filepath.Join(mnt, "d"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if want := []string{"again", "caf\xe9", "fifo", "link", "\xff\xfe"}; !equal(names, want) {
		t.Errorf("names %q, want %q", names, want)
	}
	for name, want := range map[string]int64{
		"d": 1700000000250000000, "d/caf\xe9": 1700000000123456789, "d/\xff\xfe": 1700000000600000000,
		"d/link": 1700000000999999999, "d/again": 1700000000000000001,
	} {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(mnt, name), &st); err != nil {
			t.Errorf("%q: %v", name, err)
			continue
		}
		if got := st.Mtim.Nano(); got != want {
			t.Errorf("%q: mtime %d, want %d", name, got, want)
		}
	}
	if target, err := os.Readlink(filepath.Join(mnt, "d/link")); err != nil || target != "caf\xe9" {
		t.Errorf("d/link -> %q (%v), want %q", target, err, "caf\xe9")
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "d/again")); err != nil || string(b) != "created after its whiteout\n" {
		t.Errorf("d/again: %q, %v", b, err)
	}
	for name, want := range map[string]string{"d": "user.d", "d/\xff\xfe": "user.x", "d/link": "", "d/fifo": ""} {
		if got := listXattrs(t, filepath.Join(mnt, name)); got != want {
			t.Errorf("%q has xattrs %q, want %q", name, got, want)
		}
	}
	// The metadata tree gets the same names and times.
	found := map[string]int64{}
	for _, e := range l.MetaEntries("/x") {
		found[e.Path] = e.ModTime.UnixNano()
	}
	if found["d/\xff\xfe"] != 1700000000600000000 {
		t.Errorf("metadata entries: %v", found)
	}
}

func listXattrs(t *testing.T, p string) string {
	t.Helper()
	b := make([]byte, 4096)
	n, err := unix.Llistxattr(p, b)
	if err != nil {
		t.Fatalf("listxattr %q: %v", p, err)
	}
	return strings.Join(strings.FieldsFunc(string(b[:n]), func(r rune) bool { return r == 0 }), ",")
}

// TestExactRecordRefused: a record whose digest is not the manifest's, or
// that disagrees with the TOC, is not used: the layer shows the TOC's view
// and says why.
func TestExactRecordRefused(t *testing.T) {
	blob, desc := exactBlob(t, exactEntries(), nil)
	desc.Annotations[ExactDigestAnnotation] = digest.FromString("another record").String()
	l, _ := openExact(t, blob, desc)
	if v := l.View(); !strings.Contains(v, "approximate") || !strings.Contains(v, "digest") {
		t.Errorf("view with a record of the wrong digest: %q", v)
	}
	checkTOCView(t, l)

	// A record that says an mtime the TOC cannot have rounded.
	blob, desc = exactBlob(t, exactEntries(), func(b []byte) []byte {
		var rec exactRecord
		if err := json.Unmarshal(b, &rec); err != nil {
			t.Fatal(err)
		}
		for i := range rec.Entries {
			rec.Entries[i].Mtime += 5 * int64(time.Second)
		}
		out, _ := json.Marshal(rec)
		return out
	})
	l, _ = openExact(t, blob, desc)
	if v := l.View(); !strings.Contains(v, "approximate") || !strings.Contains(v, "mtime") {
		t.Errorf("view with a record that disagrees with the TOC: %q", v)
	}
	checkTOCView(t, l)
}

// checkTOCView checks that l shows the TOC's names and times.
func checkTOCView(t *testing.T, l *Layer) {
	t.Helper()
	found := map[string]int64{}
	for _, e := range l.MetaEntries("/x") {
		found[e.Path] = e.ModTime.UnixNano()
	}
	if got, ok := found["d/\ufffd\ufffd"]; !ok || got != 1700000001000000000 {
		t.Errorf("TOC view: %v", found)
	}
}
