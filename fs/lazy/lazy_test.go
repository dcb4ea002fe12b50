package lazy

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/cache"
)

type tarEntry struct {
	hdr  tar.Header
	body []byte
}

func randomBytes(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

var mtime = time.Unix(1700000000, 123000000)

func sampleTar(t testing.TB) ([]byte, map[string][]byte) {
	files := map[string][]byte{
		"etc/hostname": []byte("lazylayer\n"),
		"data/big":     randomBytes(1, 3<<20+12345),
		"data/small":   randomBytes(2, 1000),
		"empty":        {},
	}
	entries := []tarEntry{
		{hdr: tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{hdr: tar.Header{Name: "etc/hostname", Typeflag: tar.TypeReg, Mode: 0o644, Uid: 1000, Gid: 1001}, body: files["etc/hostname"]},
		{hdr: tar.Header{Name: "etc/link", Typeflag: tar.TypeSymlink, Linkname: "hostname"}},
		{hdr: tar.Header{Name: "etc/hard", Typeflag: tar.TypeLink, Linkname: "etc/hostname", Mode: 0o644, Uid: 1000, Gid: 1001}},
		{hdr: tar.Header{Name: "etc/.wh.gone", Typeflag: tar.TypeReg, Mode: 0o644}},
		{hdr: tar.Header{Name: "data/", Typeflag: tar.TypeDir, Mode: 0o1777}},
		{hdr: tar.Header{Name: "data/.wh..wh..opq", Typeflag: tar.TypeReg, Mode: 0o644}},
		{hdr: tar.Header{Name: "data/big", Typeflag: tar.TypeReg, Mode: 0o4755}, body: files["data/big"]},
		{hdr: tar.Header{Name: "data/small", Typeflag: tar.TypeReg, Mode: 0o600,
			PAXRecords: map[string]string{"SCHILY.xattr.user.color": "blue"}}, body: files["data/small"]},
		{hdr: tar.Header{Name: "fifo", Typeflag: tar.TypeFifo, Mode: 0o644}},
		{hdr: tar.Header{Name: "null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3}},
		{hdr: tar.Header{Name: "empty", Typeflag: tar.TypeReg, Mode: 0o644}},
	}
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
	return buf.Bytes(), files
}

// testBlob serves an eStargz blob from memory and can fail or corrupt.
type testBlob struct {
	data     []byte
	requests atomic.Int64
	served   atomic.Int64
	down     atomic.Bool // answer every request with an error
	corrupt  atomic.Bool // flip bytes in what is served past the footer
	// hold, if set, keeps requests for bytes at or past hold.from (and
	// before hold.to, if set) waiting until hold.release is closed.
	hold atomic.Pointer[blobHold]
	// stall, if set, sends a reply's bytes before stall.from at once and
	// the rest once stall.release is closed (stall.to is not used).
	stall atomic.Pointer[blobHold]
}

// stalled is a reply that stops at a blob offset until released.
type stalled struct {
	ctx     context.Context
	r       io.Reader
	left    int64 // bytes until the stall
	release chan struct{}
}

func (s *stalled) Read(p []byte) (int, error) {
	if s.left == 0 {
		select {
		case <-s.release:
		case <-s.ctx.Done():
			return 0, s.ctx.Err()
		}
		s.left = -1
	}
	if s.left > 0 && int64(len(p)) > s.left {
		p = p[:s.left]
	}
	n, err := s.r.Read(p)
	if s.left > 0 {
		s.left -= int64(n)
	}
	return n, err
}

type blobHold struct {
	from, to int64
	release  chan struct{}
}

var errDown = errors.New("registry down (test)")

func (b *testBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	b.requests.Add(1)
	if h := b.hold.Load(); h != nil && off+n > h.from && (h.to == 0 || off < h.to) {
		select {
		case <-h.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if b.down.Load() {
		return nil, errDown
	}
	p := append([]byte(nil), b.data[off:off+n]...)
	b.served.Add(n)
	if b.corrupt.Load() && len(p) > 100 {
		for i := 50; i < len(p)-50; i += 7 {
			p[i] ^= 0xff
		}
	}
	if h := b.stall.Load(); h != nil && off < h.from && off+n > h.from {
		return io.NopCloser(&stalled{ctx: ctx, r: bytes.NewReader(p), left: h.from - off, release: h.release}), nil
	}
	return io.NopCloser(bytes.NewReader(p)), nil
}

type fixture struct {
	blob  *testBlob
	layer *Layer
	mnt   string
	files map[string][]byte
}

func newFixture(t *testing.T, o Options) *fixture {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	data, desc, files := buildLayer(t)
	blob := &testBlob{data: data}
	l := openLayer(t, data, blob, desc, o)
	return &fixture{blob: blob, layer: l, mnt: mountLayer(t, l), files: files}
}

// builtLayer is the eStargz blob of sampleTar, built once: building it
// takes seconds under the race detector.
var builtLayer struct {
	once  sync.Once
	data  []byte
	desc  ocispec.Descriptor
	files map[string][]byte
	err   error
}

// buildLayer returns the eStargz blob of sampleTar, its descriptor and the
// files it holds. Callers must not modify them.
func buildLayer(t testing.TB) ([]byte, ocispec.Descriptor, map[string][]byte) {
	t.Helper()
	b := &builtLayer
	b.once.Do(func() {
		tarBytes, files := sampleTar(t)
		rc, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarBytes), 0, int64(len(tarBytes))),
			estargz.WithChunkSize(256<<10), estargz.WithPrioritizedFiles([]string{"etc/hostname"}))
		if err != nil {
			b.err = err
			return
		}
		defer rc.Close()
		if b.data, b.err = io.ReadAll(rc); b.err != nil {
			return
		}
		b.files = files
		b.desc = ocispec.Descriptor{
			MediaType:   ocispec.MediaTypeImageLayerGzip,
			Digest:      digest.FromBytes(b.data),
			Size:        int64(len(b.data)),
			Annotations: map[string]string{TOCDigestAnnotation: rc.TOCDigest().String()},
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.data, b.desc, b.files
}

// openLayer opens the layer desc, whose blob is data, reading its TOC from
// data and its chunks from blob. Options left zero get a chunk cache and a
// blob copy in temporary directories.
func openLayer(t *testing.T, data []byte, blob Blob, desc ocispec.Descriptor, o Options) *Layer {
	t.Helper()
	if o.Cache == nil {
		c, err := cache.Open(context.Background(), t.TempDir(), 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		o.Cache = c
	}
	tocDigest, ok := Capable(desc)
	if !ok {
		t.Fatal("an eStargz layer with a TOC annotation is not lazy-capable")
	}
	if o.BlobPath == "" {
		o.BlobPath = filepath.Join(t.TempDir(), "blob")
	}
	l, err := Open(context.Background(), bytes.NewReader(data), blob, desc, tocDigest, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.f.stopBackground) // before the cache closes
	return l
}

// mountLayer mounts l in a temporary directory until the test ends, and
// closes l then.
func mountLayer(t *testing.T, l *Layer) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "lazy")
	os.Mkdir(mnt, 0o755)
	if err := l.Mount(context.Background(), mnt); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		done, err := l.Unmount()
		if err != nil {
			t.Errorf("unmount: %v", err)
			return
		}
		<-done
		l.Close()
	})
	return mnt
}

func TestTree(t *testing.T) {
	f := newFixture(t, Options{})
	for name, want := range f.files {
		got, err := os.ReadFile(filepath.Join(f.mnt, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: read %d bytes (%v), want %d", name, len(got), err, len(want))
		}
	}
	for _, tc := range []struct {
		name     string
		mode     uint32
		uid, gid uint32
		rdev     uint64
	}{
		{"etc", syscall.S_IFDIR | 0o755, 0, 0, 0},
		{"etc/hostname", syscall.S_IFREG | 0o644, 1000, 1001, 0},
		{"etc/link", syscall.S_IFLNK | 0o777, 0, 0, 0},
		{"etc/gone", syscall.S_IFCHR, 0, 0, 0},
		{"data", syscall.S_IFDIR | 0o1777, 0, 0, 0},
		{"data/big", syscall.S_IFREG | 0o4755, 0, 0, 0},
		{"fifo", syscall.S_IFIFO | 0o644, 0, 0, 0},
		{"null", syscall.S_IFCHR | 0o666, 0, 0, unix.Mkdev(1, 3)},
	} {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(f.mnt, tc.name), &st); err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if st.Mode != tc.mode || st.Uid != tc.uid || st.Gid != tc.gid || st.Rdev != tc.rdev {
			t.Errorf("%s: mode %o uid %d gid %d rdev %d, want %o %d %d %d", tc.name, st.Mode, st.Uid, st.Gid, st.Rdev, tc.mode, tc.uid, tc.gid, tc.rdev)
		}
		if st.Mtim.Sec != mtime.Unix() && tc.name != "etc/gone" {
			t.Errorf("%s: mtime %d, want %d", tc.name, st.Mtim.Sec, mtime.Unix())
		}
	}
	if l, err := os.Readlink(filepath.Join(f.mnt, "etc/link")); err != nil || l != "hostname" {
		t.Errorf("readlink: %q %v", l, err)
	}
	var a, b unix.Stat_t
	unix.Stat(filepath.Join(f.mnt, "etc/hostname"), &a)
	unix.Stat(filepath.Join(f.mnt, "etc/hard"), &b)
	if a.Ino != b.Ino || a.Nlink != 2 {
		t.Errorf("hard links: inodes %d and %d, nlink %d", a.Ino, b.Ino, a.Nlink)
	}
	buf := make([]byte, 16)
	if n, err := unix.Lgetxattr(filepath.Join(f.mnt, "data"), "trusted.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("opaque xattr: %q %v", buf[:n], err)
	}
	if n, err := unix.Lgetxattr(filepath.Join(f.mnt, "data/small"), "user.color", buf); err != nil || string(buf[:n]) != "blue" {
		t.Errorf("user.color: %q %v", buf[:n], err)
	}
	entries, err := os.ReadDir(f.mnt)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"data", "empty", "etc", "fifo", "null"}; !equal(names, want) {
		t.Errorf("root lists %v, want %v (eStargz metadata hidden)", names, want)
	}
	if err := os.WriteFile(filepath.Join(f.mnt, "new"), []byte("x"), 0o644); err == nil {
		t.Error("the lazy tree is writable")
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestReads(t *testing.T) {
	f := newFixture(t, Options{})
	want := f.files["data/big"]
	fh, err := os.Open(filepath.Join(f.mnt, "data/big"))
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	rng := rand.New(rand.NewSource(3))
	for i := 0; i < 200; i++ {
		off := rng.Int63n(int64(len(want)))
		n := rng.Intn(300000) + 1
		buf := make([]byte, n)
		got, err := fh.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
		}
		if !bytes.Equal(buf[:got], want[off:off+int64(got)]) {
			t.Fatalf("ReadAt(%d, %d): wrong bytes", off, n)
		}
	}
	m, err := unix.Mmap(int(fh.Fd()), 0, len(want), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m, want) {
		t.Error("mmap shows wrong bytes")
	}
	unix.Munmap(m)

	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, err := os.ReadFile(filepath.Join(f.mnt, "data/big"))
			if err != nil || !bytes.Equal(b, want) {
				errs <- errors.New("a concurrent reader saw wrong bytes or an error")
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestCorruptChunkIsNeverServed(t *testing.T) {
	f := newFixture(t, Options{ReadTimeout: time.Second})
	f.blob.corrupt.Store(true)
	b, err := os.ReadFile(filepath.Join(f.mnt, "data/big"))
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading a corrupt chunk: %d bytes, %v; want EIO", len(b), err)
	}
	f.blob.corrupt.Store(false)
	b, err = os.ReadFile(filepath.Join(f.mnt, "data/big"))
	if err != nil || !bytes.Equal(b, f.files["data/big"]) {
		t.Fatalf("after the registry is fixed: %v", err)
	}
}

func TestRegistryGoesAway(t *testing.T) {
	f := newFixture(t, Options{ReadTimeout: 2 * time.Second})
	f.blob.down.Store(true)
	start := time.Now()
	_, err := os.ReadFile(filepath.Join(f.mnt, "data/small"))
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read with the registry down: %v, want EIO", err)
	}
	if waited := time.Since(start); waited < time.Second {
		t.Errorf("the read gave up after %v, before the read timeout", waited)
	}
	// A read that starts while the registry is down succeeds when it
	// comes back within the timeout: the registry comes back once the
	// read has been refused. The prefetch gave up too, so the requests
	// from now on are the read's.
	f.layer.mu.Lock()
	prefetched := f.layer.prefetched
	f.layer.mu.Unlock()
	<-prefetched
	refused := f.blob.requests.Load()
	read, back := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(back)
		for f.blob.requests.Load() == refused {
			select {
			case <-read:
				return
			case <-time.After(time.Millisecond):
			}
		}
		f.blob.down.Store(false)
	}()
	b, err := os.ReadFile(filepath.Join(f.mnt, "data/big"))
	close(read)
	<-back
	if err != nil || !bytes.Equal(b, f.files["data/big"]) {
		t.Fatalf("read while the registry came back: %v", err)
	}
}

func TestTOCMismatch(t *testing.T) {
	f := newFixture(t, Options{})
	desc := f.layer.desc
	c, _ := cache.Open(context.Background(), t.TempDir(), 0)
	defer c.Close()
	_, err := Open(context.Background(), bytes.NewReader(f.blob.data), f.blob, desc, digest.FromString("another TOC"), Options{Cache: c})
	if !errors.Is(err, ErrTOCMismatch) {
		t.Fatalf("Open with the wrong TOC digest: %v", err)
	}
}

func TestPrefetchAndRestore(t *testing.T) {
	f := newFixture(t, Options{})
	// The prioritized file arrives without being read.
	deadline := time.Now().Add(5 * time.Second)
	for f.layer.Stats().Requests == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if f.layer.Stats().Requests == 0 {
		t.Error("the prioritized file was not prefetched")
	}
	// What Open read is enough to open the layer again without the blob.
	path := filepath.Join(t.TempDir(), "toc")
	if err := f.layer.SaveTOC(path); err != nil {
		t.Fatal(err)
	}
	rec, err := LoadRecorded(path)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := cache.Open(context.Background(), t.TempDir(), 0)
	defer c.Close()
	tocDigest, _ := Capable(f.layer.desc)
	l, err := Open(context.Background(), rec, f.blob, f.layer.desc, tocDigest, Options{Cache: c})
	if err != nil {
		t.Fatalf("Open from the saved TOC: %v", err)
	}
	if l.Entries() != f.layer.Entries() {
		t.Errorf("reopened layer has %d entries, want %d", l.Entries(), f.layer.Entries())
	}
}

// TestPOSIXTools runs the everyday tools on the lazy tree.
func TestPOSIXTools(t *testing.T) {
	f := newFixture(t, Options{})
	for _, tc := range []struct {
		cmd  []string
		want []string // substrings of the output
	}{
		{[]string{"find", f.mnt, "-printf", "%y %m %U:%G %P\n"}, []string{
			"d 755 0:0 etc", "f 644 1000:1001 etc/hostname", "l 777 0:0 etc/link", "c 0 0:0 etc/gone",
			"d 1777 0:0 data", "f 4755 0:0 data/big", "p 644 0:0 fifo", "c 666 0:0 null"}},
		{[]string{"stat", "-c", "%F %s %h %t:%T", filepath.Join(f.mnt, "etc/hostname"), filepath.Join(f.mnt, "null")},
			[]string{"regular file 10 2 0:0", "character special file 0 1 1:3"}},
		{[]string{"readlink", filepath.Join(f.mnt, "etc/link")}, []string{"hostname"}},
		{[]string{"getfattr", "-d", "-m", "-", "--absolute-names", filepath.Join(f.mnt, "data/small"), filepath.Join(f.mnt, "data")},
			[]string{`user.color="blue"`, `trusted.overlay.opaque="y"`}},
		{[]string{"sh", "-c", "ls -i " + filepath.Join(f.mnt, "etc/hostname") + " " + filepath.Join(f.mnt, "etc/hard") + " | cut -d' ' -f1 | uniq | wc -l"},
			[]string{"1"}},
	} {
		out, err := exec.Command(tc.cmd[0], tc.cmd[1:]...).CombinedOutput()
		if err != nil {
			t.Errorf("%v: %v\n%s", tc.cmd, err, out)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(string(out), w) {
				t.Errorf("%v: output lacks %q:\n%s", tc.cmd[:1], w, out)
			}
		}
	}
}
