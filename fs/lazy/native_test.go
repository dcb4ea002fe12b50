package lazy

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/extract"
	"github.com/lazylayer/lazylayer/fs/meta"
)

// nativeLayer is a lazy layer served for native metadata: its metadata
// tree and its data mount.
type nativeLayer struct {
	id    string
	l     *Layer
	meta  string // metadata tree
	fuse  string // data mount, whose root holds .lazylayer/<id>/
	place string // where population places files: <data>/.lazylayer/<id>
}

// serveNative builds the metadata tree of l and mounts its data under
// root, with data as the shared data directory, until the test ends.
func serveNative(t *testing.T, root, data, id string, l *Layer) *nativeLayer {
	t.Helper()
	n := &nativeLayer{id: id, l: l,
		meta:  filepath.Join(root, "meta-"+id),
		fuse:  filepath.Join(root, "fuse-"+id),
		place: filepath.Join(data, meta.RedirectRoot, id),
	}
	if err := meta.Build(context.Background(), n.meta, l.MetaEntries("/"+meta.RedirectRoot+"/"+id)); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(n.fuse, 0o755)
	if err := os.MkdirAll(n.place, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := l.MountData(context.Background(), n.fuse, meta.RedirectRoot+"/"+id); err != nil {
		t.Fatal(err)
	}
	l.SetPlaced(n.place)
	t.Cleanup(func() {
		done, err := l.Unmount()
		if err != nil {
			t.Errorf("unmount: %v", err)
			return
		}
		<-done
		l.Close()
	})
	return n
}

// mountOverlay mounts a read-only overlay with lowerdir until the test
// ends.
func mountOverlay(t *testing.T, lowerdir string) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "merged")
	os.Mkdir(mnt, 0o755)
	opts := "lowerdir=" + lowerdir + "," + meta.MetacopyOption
	if err := unix.Mount("overlay", mnt, "overlay", unix.MS_RDONLY, opts); err != nil {
		t.Fatalf("mount overlay -o %s: %v", opts, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount overlay: %v", err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	return mnt
}

func nativeSetup(t *testing.T) (root, data string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE and overlay needs root")
	}
	if err := meta.Check(context.Background(), t.TempDir()); err != nil {
		t.Skipf("no native metadata here: %v", err)
	}
	root = t.TempDir()
	data = filepath.Join(root, "data")
	return root, data
}

// TestNativeOverlay serves a layer as metadata tree, data directory and
// data mount, and checks that a file opened before population stays on
// FUSE while every file first opened after it reads from the data
// directory without a single FUSE request.
func TestNativeOverlay(t *testing.T) {
	root, data := nativeSetup(t)
	raw, desc, files := buildLayer(t)
	blob := &testBlob{data: raw}
	n := serveNative(t, root, data, "1", openLayer(t, raw, blob, desc, Options{}))
	mnt := mountOverlay(t, n.meta+"::"+data+"::"+n.fuse)

	// Metadata is native: walking the tree and stat-ing every name
	// reaches no FUSE server.
	before := n.l.Stats().FUSERequests
	var names []string
	filepath.WalkDir(mnt, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			t.Errorf("walk %s: %v", p, err)
			return nil
		}
		// A whiteout in the bottom layer is listed but hides itself.
		if _, err := d.Info(); err != nil && !(d.Name() == "gone" && errors.Is(err, os.ErrNotExist)) {
			t.Errorf("stat %s: %v", p, err)
		}
		names = append(names, strings.TrimPrefix(p, mnt))
		return nil
	})
	if got := n.l.Stats().FUSERequests; got != before {
		t.Errorf("walking the tree made %d FUSE requests, want 0", got-before)
	}
	if len(names) < 10 {
		t.Errorf("the tree shows only %v", names)
	}
	st, err := os.Stat(filepath.Join(mnt, "data/big"))
	if err != nil || st.Size() != int64(len(files["data/big"])) || st.Mode()&os.ModeSetuid == 0 {
		t.Errorf("stat data/big: %v %v", st, err)
	}
	if v, err := unix.Getxattr(filepath.Join(mnt, "data/small"), "user.color", make([]byte, 16)); err != nil || v != 4 {
		t.Errorf("xattr user.color of data/small: %d %v", v, err)
	}

	// A file opened before population is bound to the data mount.
	early, err := os.Open(filepath.Join(mnt, "data/small"))
	if err != nil {
		t.Fatal(err)
	}
	defer early.Close()
	if b, err := io.ReadAll(early); err != nil || !bytes.Equal(b, files["data/small"]) {
		t.Fatalf("read data/small while lazy: %v", err)
	}
	if b := n.l.Stats().Bound; b != 1 {
		t.Errorf("%d files bound to FUSE, want 1", b)
	}

	staging := filepath.Join(root, "staging")
	os.Mkdir(staging, 0o700)
	if err := n.l.PopulateInto(context.Background(), staging, n.place, PopulateOptions{RangeSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	// Every other file is read natively now.
	before = n.l.Stats().FUSERequests
	for name, want := range files {
		if name == "data/small" {
			continue
		}
		if b, err := os.ReadFile(filepath.Join(mnt, name)); err != nil || !bytes.Equal(b, want) {
			t.Errorf("read %s after population: %v", name, err)
		}
	}
	if got := n.l.Stats().FUSERequests; got != before {
		t.Errorf("reading the files not opened before made %d FUSE requests, want 0", got-before)
	}
	// The early file keeps reading, through FUSE.
	if b, err := io.ReadAll(io.NewSectionReader(early, 0, 1<<20)); err != nil || !bytes.Equal(b, files["data/small"]) {
		t.Errorf("read the early file after population: %v", err)
	}
	// The data directory holds the layer's whole tree.
	for name, want := range files {
		if b, err := os.ReadFile(filepath.Join(n.place, name)); err != nil || !bytes.Equal(b, want) {
			t.Errorf("placed %s: %v", name, err)
		}
	}
	for _, name := range []string{"etc/link", "fifo", "null", "etc/gone"} {
		if _, err := os.Lstat(filepath.Join(n.place, name)); err != nil {
			t.Errorf("the complete tree lacks %s: %v", name, err)
		}
	}
	a, _ := os.Stat(filepath.Join(n.place, "etc/hostname"))
	b, _ := os.Stat(filepath.Join(n.place, "etc/hard"))
	if !os.SameFile(a, b) {
		t.Error("etc/hard is not a hard link of etc/hostname in the complete tree")
	}
	if st, err := os.Stat(filepath.Join(n.place, "data")); err != nil || st.Mode()&os.ModeSticky == 0 {
		t.Errorf("data/ in the complete tree: %v %v (want sticky)", st, err)
	}
	for _, dir := range []string{"etc", "data"} {
		if st, err := os.Stat(filepath.Join(n.place, dir)); err != nil || !st.ModTime().Equal(mtime) {
			t.Errorf("%s/ in the complete tree: mtime %v (%v), want the image's %v", dir, st.ModTime(), err, mtime)
		}
	}
	if v, err := unix.Getxattr(filepath.Join(n.place, "data"), "trusted.overlay.opaque", make([]byte, 4)); err != nil || v != 1 {
		t.Errorf("data/ in the complete tree is not opaque: %v", err)
	}
}

// TestNativeUnverifiedFileNeverPlaced: a file whose bytes do not match the
// TOC never appears in the data directory, and population fails as bad
// data.
func TestNativeUnverifiedFileNeverPlaced(t *testing.T) {
	root, data := nativeSetup(t)
	raw, desc, _ := buildLayer(t)
	l := openLayer(t, raw, &testBlob{data: raw}, desc, Options{})
	// The TOC (as indexed) says data/small is other bytes. (Before the
	// mount: its prefetch reads the index.)
	for _, c := range chunksOf(t, l, "data/small") {
		for i := range l.ix.chunks {
			if l.ix.chunks[i].digest == c.digest {
				l.ix.chunks[i].digest[0] ^= 0xff
			}
		}
	}
	n := serveNative(t, root, data, "1", l)
	staging := filepath.Join(root, "staging")
	os.Mkdir(staging, 0o700)
	err := l.PopulateInto(context.Background(), staging, n.place, PopulateOptions{RangeSize: 1 << 20})
	if !errors.Is(err, extract.ErrInvalid) {
		t.Fatalf("PopulateInto with a file that does not match: %v, want bad data", err)
	}
	if _, err := os.Lstat(filepath.Join(n.place, "data/small")); err == nil {
		t.Error("a file that failed verification was placed")
	}
}

// TestNativeCraftedTOC: a layer whose TOC carries overlay's own attributes
// (a redirect and metacopy pointing at another layer's data) or the name
// redirects use cannot make one layer's file read another's data.
func TestNativeCraftedTOC(t *testing.T) {
	root, data := nativeSetup(t)
	raw1, desc1, files1 := buildLayer(t)
	n1 := serveNative(t, root, data, "1", openLayer(t, raw1, &testBlob{data: raw1}, desc1, Options{}))

	target := "/" + meta.RedirectRoot + "/1/data/small"
	mine := []byte("the crafted layer's own bytes\n")
	raw2, desc2 := blobOf(t, []tarEntry{
		{hdr: tar.Header{Name: "x", Typeflag: tar.TypeReg, Mode: 0o644, PAXRecords: map[string]string{
			"SCHILY.xattr.trusted.overlay.redirect": target,
			"SCHILY.xattr.trusted.overlay.metacopy": "",
			"SCHILY.xattr.user.overlay.redirect":    target,
		}}, body: mine},
		{hdr: tar.Header{Name: "y", Typeflag: tar.TypeReg, Mode: 0o644, PAXRecords: map[string]string{
			"SCHILY.xattr.trusted.overlay.redirect": target,
			"SCHILY.xattr.trusted.overlay.metacopy": "",
		}}},
	})
	l2 := openLayer(t, raw2, &testBlob{data: raw2}, desc2, Options{})
	n2 := serveNative(t, root, data, "2", l2)
	for _, e := range l2.MetaEntries("/" + meta.RedirectRoot + "/2") {
		for k := range e.Xattrs {
			if !meta.KeepXattr(k) {
				t.Errorf("%s: the metadata tree would get the image's %s", e.Path, k)
			}
		}
	}
	mnt := mountOverlay(t, n2.meta+":"+n1.meta+"::"+data+"::"+n2.fuse+"::"+n1.fuse)
	if b, err := os.ReadFile(filepath.Join(mnt, "x")); err != nil || !bytes.Equal(b, mine) {
		t.Errorf("x reads %q (%v), want its own bytes", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "y")); err != nil || len(b) != 0 {
		t.Errorf("the empty file y reads %d bytes (%v): another layer's data", len(b), err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "data/small")); err != nil || !bytes.Equal(b, files1["data/small"]) {
		t.Errorf("layer 1's data/small: %v", err)
	}
	// Served as a plain lower directory (no metadata tree), the layer's
	// FUSE mount does not show overlay's attributes either.
	for _, name := range []string{"x", "y"} {
		p := filepath.Join(n2.fuse, meta.RedirectRoot, "2", name)
		if _, err := unix.Getxattr(p, "trusted.overlay.redirect", make([]byte, 256)); !errors.Is(err, unix.ENODATA) {
			t.Errorf("%s on FUSE: trusted.overlay.redirect: %v, want ENODATA", name, err)
		}
	}

	// A layer holding the name redirects use gets no metadata tree.
	raw3, desc3 := blobOf(t, []tarEntry{
		{hdr: tar.Header{Name: meta.RedirectRoot + "/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{hdr: tar.Header{Name: meta.RedirectRoot + "/1/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{hdr: tar.Header{Name: meta.RedirectRoot + "/1/data/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{hdr: tar.Header{Name: meta.RedirectRoot + "/1/data/small", Typeflag: tar.TypeReg, Mode: 0o644}, body: mine},
	})
	l3 := openLayer(t, raw3, &testBlob{data: raw3}, desc3, Options{})
	t.Cleanup(func() { l3.Close() })
	err := meta.Build(context.Background(), filepath.Join(root, "meta-3"), l3.MetaEntries("/"+meta.RedirectRoot+"/3"))
	if err == nil || !strings.Contains(err.Error(), meta.RedirectRoot) {
		t.Errorf("metadata tree of a layer holding %s: %v, want it refused", meta.RedirectRoot, err)
	}
}

// blobOf returns the eStargz blob of a tar of entries and its descriptor.
func blobOf(t *testing.T, entries []tarEntry) ([]byte, ocispec.Descriptor) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		e.hdr.ModTime = mtime
		e.hdr.Size = int64(len(e.body))
		e.hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(&e.hdr); err != nil {
			t.Fatal(err)
		}
		tw.Write(e.body)
	}
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
	return blob, ocispec.Descriptor{
		MediaType:   ocispec.MediaTypeImageLayerGzip,
		Digest:      digest.FromBytes(blob),
		Size:        int64(len(blob)),
		Annotations: map[string]string{TOCDigestAnnotation: rc.TOCDigest().String()},
	}
}

// TestPopulateIntoMany: population places files while extraction goes on
// (on a goroutine of its own, up to placeQueue entries behind); a layer of
// more files than that, with a hard link, ends up placed whole, each file
// with its bytes, the link sharing its file's inode.
func TestPopulateIntoMany(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("population sets owners: needs root")
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	want := map[string]string{}
	add := func(hdr *tar.Header, body string) {
		hdr.ModTime, hdr.Size = mtime, int64(len(body))
		if hdr.Mode == 0 {
			hdr.Mode = 0o644
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, body)
	}
	for i := 0; i < 3*placeQueue; i++ {
		if i%100 == 0 {
			add(&tar.Header{Name: fmt.Sprintf("d%d/", i/100), Typeflag: tar.TypeDir, Mode: 0o755}, "")
		}
		name, body := fmt.Sprintf("d%d/f%04d", i/100, i), fmt.Sprintf("file %d\n", i)
		add(&tar.Header{Name: name, Typeflag: tar.TypeReg}, body)
		want[name] = body
		if i == placeQueue {
			add(&tar.Header{Name: "linked", Typeflag: tar.TypeReg}, "linked bytes\n")
			add(&tar.Header{Name: "d0/link", Typeflag: tar.TypeLink, Linkname: "linked"}, "")
			want["linked"], want["d0/link"] = "linked bytes\n", "linked bytes\n"
		}
	}
	tw.Close()
	rc, err := estargz.Build(io.NewSectionReader(bytes.NewReader(buf.Bytes()), 0, int64(buf.Len())))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(raw), Size: int64(len(raw)),
		Annotations: map[string]string{TOCDigestAnnotation: rc.TOCDigest().String()}}
	l := openLayer(t, raw, &testBlob{data: raw}, desc, Options{})
	defer l.Close()
	root := t.TempDir()
	staging, place := filepath.Join(root, "staging"), filepath.Join(root, "place")
	os.Mkdir(staging, 0o700)
	if err := l.PopulateInto(context.Background(), staging, place, PopulateOptions{RangeSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	for name, body := range want {
		if b, err := os.ReadFile(filepath.Join(place, name)); err != nil || string(b) != body {
			t.Errorf("placed %s: %q, %v; want %q", name, b, err, body)
		}
	}
	a, errA := os.Stat(filepath.Join(place, "linked"))
	b, errB := os.Stat(filepath.Join(place, "d0/link"))
	if errA != nil || errB != nil || !os.SameFile(a, b) {
		t.Errorf("d0/link is not a hard link of linked in the complete tree: %v %v", errA, errB)
	}
}
