package extract

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

type entry struct {
	name, link string
	typ        byte
	mode       int64
	body       string
}

func tarOf(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		hdr := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: mode,
			Size: int64(len(e.body)), ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
		if e.typ != tar.TypeReg {
			hdr.Size = 0
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if hdr.Size > 0 {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gzipOf(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zstdOf(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw, err := zstd.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

var sample = []entry{
	{name: "etc/", typ: tar.TypeDir, mode: 0o755},
	{name: "etc/hostname", typ: tar.TypeReg, body: "lazylayer\n"},
	{name: "etc/link", typ: tar.TypeSymlink, link: "hostname"},
	{name: "etc/hard", typ: tar.TypeLink, link: "etc/hostname"},
	{name: "etc/.wh.gone", typ: tar.TypeReg},
	{name: "opaque/", typ: tar.TypeDir, mode: 0o755},
	{name: "opaque/.wh..wh..opq", typ: tar.TypeReg},
}

func TestLayerFormats(t *testing.T) {
	plain := tarOf(t, sample...)
	for _, tc := range []struct {
		name string
		blob []byte
	}{
		{"tar", plain},
		{"gzip", gzipOf(t, plain)},
		{"zstd", zstdOf(t, plain)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			res, err := Layer(context.Background(), bytes.NewReader(tc.blob), dir, Options{
				Digest: digest.FromBytes(tc.blob), Size: int64(len(tc.blob)), DiffID: digest.FromBytes(plain),
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.DiffID != digest.FromBytes(plain) || res.ImplicitDirs {
				t.Errorf("result %+v", res)
			}
			if b, err := os.ReadFile(filepath.Join(dir, "etc/hostname")); err != nil || string(b) != "lazylayer\n" {
				t.Errorf("etc/hostname: %q, %v", b, err)
			}
			if l, err := os.Readlink(filepath.Join(dir, "etc/link")); err != nil || l != "hostname" {
				t.Errorf("etc/link: %q, %v", l, err)
			}
			var a, b unix.Stat_t
			unix.Lstat(filepath.Join(dir, "etc/hostname"), &a)
			unix.Lstat(filepath.Join(dir, "etc/hard"), &b)
			if a.Ino != b.Ino {
				t.Error("etc/hard is not a hard link of etc/hostname")
			}
			var wh unix.Stat_t
			if err := unix.Lstat(filepath.Join(dir, "etc/gone"), &wh); err != nil || wh.Mode&unix.S_IFMT != unix.S_IFCHR || wh.Rdev != 0 {
				t.Errorf("whiteout etc/gone: mode %o rdev %d, %v", wh.Mode, wh.Rdev, err)
			}
			v := make([]byte, 8)
			if n, err := unix.Lgetxattr(filepath.Join(dir, "opaque"), "trusted.overlay.opaque", v); err != nil || string(v[:n]) != "y" {
				t.Errorf("opaque dir xattr: %q, %v", v[:n], err)
			}
		})
	}
}

func TestLayerRejectsBadData(t *testing.T) {
	good := gzipOf(t, tarOf(t, sample...))
	for _, tc := range []struct {
		name string
		blob []byte
		opts func(*Options)
		want string
	}{
		{name: "dotdot", blob: tarOf(t, entry{name: "../evil", typ: tar.TypeReg, body: "x"}), want: `"../evil": path escapes the layer root`},
		{name: "nested dotdot", blob: tarOf(t, entry{name: "a/../../evil", typ: tar.TypeReg, body: "x"}), want: "path escapes the layer root"},
		{name: "absolute", blob: tarOf(t, entry{name: "/etc/evil", typ: tar.TypeReg, body: "x"}), want: `"/etc/evil": absolute path`},
		{name: "through symlink", blob: tarOf(t,
			entry{name: "escape", typ: tar.TypeSymlink, link: "/etc"},
			entry{name: "escape/passwd", typ: tar.TypeReg, body: "x"}), want: `path goes through symlink "escape"`},
		{name: "hardlink out", blob: tarOf(t, entry{name: "h", typ: tar.TypeLink, link: "../../etc/shadow"}), want: "hard link target"},
		{name: "digest", blob: good, opts: func(o *Options) { o.Digest = digest.FromString("other") }, want: "blob bytes have digest"},
		{name: "size", blob: good, opts: func(o *Options) { o.Size++ }, want: "the manifest says"},
		{name: "diffid", blob: good, opts: func(o *Options) { o.DiffID = digest.FromString("other") }, want: "uncompressed tar has digest"},
		{name: "truncated gzip", blob: good[:len(good)/2], want: "unexpected EOF"},
		{name: "corrupt gzip", blob: append(append([]byte{}, good[:20]...), bytes.Repeat([]byte{0xff}, 200)...), want: "invalid layer data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			outside := t.TempDir()
			dir := filepath.Join(outside, "root")
			os.Mkdir(dir, 0o755)
			opts := Options{Digest: digest.FromBytes(tc.blob)}
			if tc.opts != nil {
				opts.Digest = digest.FromBytes(good)
				opts.Size = int64(len(good))
				tc.opts(&opts)
			}
			_, err := Layer(context.Background(), bytes.NewReader(tc.blob), dir, opts)
			if err == nil {
				t.Fatal("extraction succeeded")
			}
			if !errors.Is(err, ErrInvalid) || !errdefs.IsDataLoss(err) {
				t.Errorf("error is not classified as invalid data: %v", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			entries, _ := os.ReadDir(outside)
			if len(entries) != 1 {
				t.Errorf("something was written outside the layer root: %v", entries)
			}
		})
	}
}

type failingReader struct {
	r   io.Reader
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if err == io.EOF {
		return n, f.err
	}
	return n, err
}

func TestLayerSourceErrorIsNotBadData(t *testing.T) {
	blob := gzipOf(t, tarOf(t, sample...))
	srcErr := errors.New("registry went away")
	_, err := Layer(context.Background(), &failingReader{r: bytes.NewReader(blob[:len(blob)/2]), err: srcErr}, t.TempDir(),
		Options{Digest: digest.FromBytes(blob)})
	if !errors.Is(err, srcErr) {
		t.Fatalf("source error lost: %v", err)
	}
	if errors.Is(err, ErrInvalid) {
		t.Errorf("a source failure was classified as bad data: %v", err)
	}
}

func TestLayerImplicitDirs(t *testing.T) {
	blob := tarOf(t, entry{name: "usr/lib/x", typ: tar.TypeReg, body: "x"})
	res, err := Layer(context.Background(), bytes.NewReader(blob), t.TempDir(), Options{Digest: digest.FromBytes(blob)})
	if err != nil {
		t.Fatal(err)
	}
	if !res.ImplicitDirs {
		t.Error("ImplicitDirs is false for a tar that lists no directories")
	}
}

// FuzzLayer feeds arbitrary tar streams to Layer: it must not panic and must
// never write outside the directory it was given.
func FuzzLayer(f *testing.F) {
	f.Add(tarOf(f, sample...))
	f.Add(tarOf(f, entry{name: "l", typ: tar.TypeSymlink, link: ".."}, entry{name: "l/x", typ: tar.TypeReg, body: "x"}))
	f.Add(tarOf(f, entry{name: "../x", typ: tar.TypeReg, body: "x"}))
	f.Fuzz(func(t *testing.T, blob []byte) {
		outside := t.TempDir()
		dir := filepath.Join(outside, "root")
		os.Mkdir(dir, 0o755)
		Layer(context.Background(), bytes.NewReader(blob), dir, Options{Digest: digest.FromBytes(blob)})
		entries, _ := os.ReadDir(outside)
		if len(entries) != 1 {
			t.Fatalf("written outside the layer root: %v", entries)
		}
	})
}
