package extract

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
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
		// A sparse file of 256 MiB in 2.5 KiB of tar; containerd would write
		// out every byte of its holes. Three ways to say it: PAX 0.1 (map in
		// the records), PAX 1.0 (map in the data), old GNU type 'S'.
		{name: "sparse pax 0.1", blob: sparseTar(t, "GNU.sparse.major", "0", "GNU.sparse.minor", "1",
			"GNU.sparse.numblocks", "0", "GNU.sparse.size", "268435456"), want: `tar entry "big": GNU sparse file of 268435456 bytes`},
		{name: "sparse pax 1.0", blob: sparseTar(t, "GNU.sparse.major", "1", "GNU.sparse.minor", "0",
			"GNU.sparse.name", "big", "GNU.sparse.realsize", "268435456"), want: "GNU sparse file of 268435456 bytes"},
		{name: "sparse old gnu", blob: oldGNUSparseTar(268435456), want: "unhandled tar header type 83"},
		// 621 bytes of gzip hold a 400 KB name of 200001 components.
		{name: "name over PATH_MAX", blob: gzipOf(t, tarOf(t, entry{name: strings.Repeat("a/", 200000) + "f", typ: tar.TypeReg})),
			want: "path of 400001 bytes, longer than PATH_MAX"},
		{name: "too deep", blob: tarOf(t, entry{name: strings.Repeat("a/", maxDepth) + "f", typ: tar.TypeReg}),
			want: "path of 257 components, more than 256"},
		{name: "hard link target too deep", blob: tarOf(t, entry{name: "h", typ: tar.TypeLink, link: strings.Repeat("a/", maxDepth) + "f"}),
			want: "hard link target"},
		// A 10-byte zstd frame that asks for a 512 MiB window.
		{name: "zstd window", blob: []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x98, 0x0b, 0x00, 0x00, 'a'}, want: "window size exceeded"},
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

// ustarHeader is a tar header block as archive/tar's Writer will not write
// one: for a sparse file. magic is "ustar\x0000" (POSIX) or "ustar  \x00"
// (old GNU).
func ustarHeader(name string, typ byte, size int64, magic string) []byte {
	b := make([]byte, 512)
	copy(b[0:], name)
	copy(b[100:], "0000644\x00")
	copy(b[108:], "0000000\x00")
	copy(b[116:], "0000000\x00")
	copy(b[124:], fmt.Sprintf("%011o\x00", size))
	copy(b[136:], "15000000000\x00")
	b[156] = typ
	copy(b[257:], magic)
	return b
}

// withChecksum fills in the checksum of a header block.
func withChecksum(b []byte) []byte {
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

// padBlock pads b to a whole number of 512-byte tar blocks.
func padBlock(b []byte) []byte {
	return append(b, make([]byte, (512-len(b)%512)%512)...)
}

// paxRecord is one "len key=value\n" record of a PAX header.
func paxRecord(k, v string) string {
	rec := " " + k + "=" + v + "\n"
	n := len(rec)
	for n != len(strconv.Itoa(n))+len(rec) {
		n = len(strconv.Itoa(n)) + len(rec)
	}
	return strconv.Itoa(n) + rec
}

// sparseTar is a tar of one GNU sparse file "big" that is all hole, its
// size and format given by PAX records (key, value, key, value...).
func sparseTar(t testing.TB, kv ...string) []byte {
	t.Helper()
	var recs string
	for i := 0; i+1 < len(kv); i += 2 {
		recs += paxRecord(kv[i], kv[i+1])
	}
	var data []byte
	if kv[1] == "1" {
		data = padBlock([]byte("0\n")) // format 1.0: the map, no entries
	}
	var buf bytes.Buffer
	buf.Write(withChecksum(ustarHeader("PaxHeaders/big", tar.TypeXHeader, int64(len(recs)), "ustar\x0000")))
	buf.Write(padBlock([]byte(recs)))
	buf.Write(withChecksum(ustarHeader("big", tar.TypeReg, int64(len(data)), "ustar\x0000")))
	buf.Write(data)
	buf.Write(make([]byte, 1024))
	return buf.Bytes()
}

// oldGNUSparseTar is a tar of one old-GNU sparse file (type 'S') of
// realSize bytes that is all hole.
func oldGNUSparseTar(realSize int64) []byte {
	hdr := ustarHeader("big", tar.TypeGNUSparse, 0, "ustar  \x00")
	copy(hdr[483:], fmt.Sprintf("%011o\x00", realSize))
	return append(withChecksum(hdr), make([]byte, 1024)...)
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

// TestLayerDeepPath extracts a path of maxDepth components, the deepest
// that is accepted.
func TestLayerDeepPath(t *testing.T) {
	name := strings.Repeat("a/", maxDepth-1) + "f"
	blob := tarOf(t, entry{name: name, typ: tar.TypeReg, body: "deep"})
	dir := t.TempDir()
	if _, err := Layer(context.Background(), bytes.NewReader(blob), dir, Options{Digest: digest.FromBytes(blob)}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, name)); err != nil || string(b) != "deep" {
		t.Errorf("%d components deep: %q, %v", maxDepth, b, err)
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

// FuzzLayer feeds arbitrary blobs (tar, gzip, zstd) to Layer: it must not
// panic, must never write outside the directory it was given, and must not
// take long on any input (go test fails one that runs 10 s). The seeds
// include the inputs that once cost far more than their size: a sparse file
// that is all hole, a name deeper than maxDepth, a zstd frame asking for a
// 512 MiB window.
//
// An input costs about a millisecond: Layer really extracts it, into a new
// directory, which is removed after. That is cheap enough to fuzz with
// (several hundred inputs a second on two busy cores), not to minimize with:
// go test minimizes every input that finds new code, by trying it again with
// each byte and then each range of bytes removed, O(n²) runs for n bytes,
// and a tar input is one to five KiB. Left at the default -fuzzminimizetime
// of 60s, each new input held a worker for the whole minute, then go test
// killed the worker and dropped its runs from the count: the "stall" of 7
// inputs in 3 minutes. script/fuzz.sh bounds minimization by a count
// (-fuzzminimizetime=1000x), which the worker stops at and reports; run by
// hand, pass the same.
func FuzzLayer(f *testing.F) {
	f.Add(tarOf(f, sample...))
	f.Add(gzipOf(f, tarOf(f, sample...)))
	f.Add(zstdOf(f, tarOf(f, sample...)))
	f.Add(tarOf(f, entry{name: "l", typ: tar.TypeSymlink, link: ".."}, entry{name: "l/x", typ: tar.TypeReg, body: "x"}))
	f.Add(tarOf(f, entry{name: "../x", typ: tar.TypeReg, body: "x"}))
	f.Add(sparseTar(f, "GNU.sparse.major", "0", "GNU.sparse.minor", "1", "GNU.sparse.numblocks", "0", "GNU.sparse.size", "268435456"))
	f.Add(oldGNUSparseTar(268435456))
	f.Add(tarOf(f, entry{name: strings.Repeat("a/", maxDepth) + "f", typ: tar.TypeReg}))
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x98, 0x0b, 0x00, 0x00, 'a'})
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
