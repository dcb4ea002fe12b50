package meta

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func file(p, redirect string, size int) Entry {
	return Entry{Path: p, Mode: modeReg | 0o644, Size: int64(size), Redirect: redirect}
}

// TestFirstDataLayerWins: a file whose data is in LOCALDATA is read from
// there, one whose data is only in the second data layer from that one.
func TestFirstDataLayerWins(t *testing.T) {
	s := newStack(t)
	both, remoteOnly := "/"+RedirectRoot+"/k/1", "/"+RedirectRoot+"/k/2"
	s.put(s.local, both, "local\n")
	s.put(s.remote, both, "remot\n")
	s.put(s.remote, remoteOnly, "remote only\n")
	m := s.meta([]Entry{file("both", both, 6), file("remote", remoteOnly, 12)})
	mnt := s.mount([]string{m}, "")
	if got := readFile(t, filepath.Join(mnt, "both")); got != "local\n" {
		t.Errorf("both: read %q, want the local data", got)
	}
	if got := readFile(t, filepath.Join(mnt, "remote")); got != "remote only\n" {
		t.Errorf("remote: read %q", got)
	}
}

// TestSwap: overlay binds a file to a data layer at its first open. A file
// opened before its data is renamed into LOCALDATA keeps reading the second
// data layer, for as long as its dentry lives; a file first opened after
// the rename (even if stat'ed before) reads LOCALDATA.
func TestSwap(t *testing.T) {
	s := newStack(t)
	ra, rb := "/"+RedirectRoot+"/k/a", "/"+RedirectRoot+"/k/b"
	s.put(s.remote, ra, "remote a\n")
	s.put(s.remote, rb, "remote b\n")
	m := s.meta([]Entry{file("a", ra, 9), file("b", rb, 9)})
	mnt := s.mount([]string{m}, "")

	a, err := os.Open(filepath.Join(mnt, "a"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close() // keeps a's dentry, and so its binding, alive
	if got := readAt(t, a); got != "remote a\n" {
		t.Fatalf("a before the swap: %q", got)
	}
	lstat(t, filepath.Join(mnt, "b")) // a stat does not bind

	s.put(s.local, ra, "local  a\n")
	s.put(s.local, rb, "local  b\n")

	if got := readAt(t, a); got != "remote a\n" {
		t.Errorf("a through the fd opened before the swap: %q", got)
	}
	if got := readFile(t, filepath.Join(mnt, "a")); got != "remote a\n" {
		t.Errorf("a opened again while bound: %q, want the remote data", got)
	}
	if got := readFile(t, filepath.Join(mnt, "b")); got != "local  b\n" {
		t.Errorf("b first opened after the swap: %q, want the local data", got)
	}
}

func readAt(t *testing.T, f *os.File) string {
	t.Helper()
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestStackedNeedsMetacopy: overlay serves a metacopy file from the
// data-only layers without metacopy=on only when its tree is the last
// lower layer; with any lower layer below it the file is refused.
func TestStackedNeedsMetacopy(t *testing.T) {
	s := newStack(t)
	r := "/" + RedirectRoot + "/k/1"
	s.put(s.remote, r, "data\n")
	top := s.meta([]Entry{file("f", r, 5)})
	plain := filepath.Join(s.dir, "plain")
	if err := os.Mkdir(plain, 0o755); err != nil {
		t.Fatal(err)
	}

	mnt := s.mount([]string{top, plain}, "")
	if _, err := os.ReadFile(filepath.Join(mnt, "f")); !errors.Is(err, unix.EPERM) {
		t.Errorf("without %s, read gave %v, want EPERM", MetacopyOption, err)
	}
	mnt = s.mount([]string{top, plain}, "", MetacopyOption)
	if got := readFile(t, filepath.Join(mnt, "f")); got != "data\n" {
		t.Errorf("with %s: read %q", MetacopyOption, got)
	}
	mnt = s.mount([]string{plain, top}, "")
	if got := readFile(t, filepath.Join(mnt, "f")); got != "data\n" {
		t.Errorf("tree last, without %s: read %q", MetacopyOption, got)
	}
}

// TestRedirectCollision shows why a plain lower layer must not hold
// RedirectRoot: overlay looks a redirect up in the lower layers below the
// metacopy file before the data-only layers.
func TestRedirectCollision(t *testing.T) {
	s := newStack(t)
	r := "/" + RedirectRoot + "/k/1"
	s.put(s.remote, r, "mine\n")
	top := s.meta([]Entry{file("f", r, 5)})
	plain := filepath.Join(s.dir, "plain")
	s.put(plain, r, "evil\n")

	if err := CheckLower(plain); err == nil {
		t.Errorf("CheckLower accepted a layer that holds %s", RedirectRoot)
	}
	if err := CheckLower(top); err != nil {
		t.Errorf("CheckLower(metadata tree): %v", err)
	}
	mnt := s.mount([]string{top, plain}, "", MetacopyOption)
	if got := readFile(t, filepath.Join(mnt, "f")); got != "evil\n" {
		t.Errorf("read %q: the kernel no longer serves a lower layer's file for a redirect; revisit CheckLower", got)
	}
}

// TestCopyUp checks what a writable container leaves in its upper
// directory. Without metacopy=on a chmod copies the whole file up; with it,
// only metadata, and the upper directory then needs metacopy=on forever.
func TestCopyUp(t *testing.T) {
	s := newStack(t)
	ra, rb := "/"+RedirectRoot+"/k/a", "/"+RedirectRoot+"/k/b"
	s.put(s.remote, ra, "data of a\n")
	s.put(s.local, rb, "data of b\n")
	m := s.meta([]Entry{file("a", ra, 10), file("b", rb, 10)})

	for _, opts := range [][]string{nil, {MetacopyOption}} {
		name := "default"
		if opts != nil {
			name = "metacopy"
		}
		t.Run(name, func(t *testing.T) {
			upper := filepath.Join(s.dir, "upper-"+name)
			mnt := s.mount([]string{m}, upper, opts...)
			if err := os.Chmod(filepath.Join(mnt, "a"), 0o600); err != nil {
				t.Fatal(err)
			}
			appendTo(t, filepath.Join(mnt, "b"), "more\n")
			if got := readFile(t, filepath.Join(mnt, "a")); got != "data of a\n" {
				t.Errorf("a through overlay: %q", got)
			}

			// b was written: always a complete file.
			if got := readFile(t, filepath.Join(upper, "b")); got != "data of b\nmore\n" {
				t.Errorf("upper b: %q", got)
			}
			if _, ok := xattrs(t, filepath.Join(upper, "b"))[xattrMetacopy]; ok {
				t.Errorf("upper b is a metacopy file")
			}

			_, stub := xattrs(t, filepath.Join(upper, "a"))[xattrMetacopy]
			if got := lstat(t, filepath.Join(upper, "a")).Mode; got != modeReg|0o600 {
				t.Errorf("upper a: mode %#o", got)
			}
			if opts == nil {
				if stub || readFile(t, filepath.Join(upper, "a")) != "data of a\n" {
					t.Errorf("upper a is not a complete copy (metacopy %v)", stub)
				}
				return
			}
			if !stub || hasData(t, filepath.Join(upper, "a")) {
				t.Errorf("with %s, upper a: metacopy %v; the kernel no longer copies up metadata only", MetacopyOption, stub)
			}
			// The upper directory now depends on metacopy=on.
			s.unmount(mnt)
			mnt = s.mount([]string{m}, upper)
			if _, err := os.ReadFile(filepath.Join(mnt, "a")); !errors.Is(err, unix.EPERM) {
				t.Errorf("upper a mounted without %s: read gave %v, want EPERM", MetacopyOption, err)
			}
			s.unmount(mnt)

			// Once the layer is local, the stub finds its data by path in
			// the plain tree that replaced the metadata tree (it holds
			// only an origin file handle, no redirect).
			if _, ok := xattrs(t, filepath.Join(upper, "a"))[xattrRedirect]; ok {
				t.Errorf("upper a has a redirect")
			}
			local := filepath.Join(s.dir, "local-layer")
			s.put(local, "a", "data of a\n")
			s.put(local, "b", "data of b\n")
			mnt = s.mount([]string{local}, upper, MetacopyOption)
			if got := readFile(t, filepath.Join(mnt, "a")); got != "data of a\n" {
				t.Errorf("a over the local layer: %q", got)
			}
			if got := lstat(t, filepath.Join(mnt, "a")).Mode; got != modeReg|0o600 {
				t.Errorf("a over the local layer: mode %#o", got)
			}
		})
	}
}

func appendTo(t *testing.T, p, s string) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCheck runs the start-up check on this machine.
func TestCheck(t *testing.T) {
	requireRoot(t)
	if err := Check(t.Context(), t.TempDir()); err != nil {
		t.Fatal(err)
	}
}

func TestLowerDir(t *testing.T) {
	for _, c := range []struct {
		lower, data []string
		want        string
		err         bool
	}{
		{[]string{"/m2", "/m1"}, []string{"/local", "/fuse"}, "/m2:/m1::/local::/fuse", false},
		{[]string{"/m"}, nil, "/m", false},
		{[]string{"/m"}, []string{"/d"}, "/m::/d", false},
		{nil, []string{"/d"}, "", true},
		{[]string{"m"}, nil, "", true},
		{[]string{"/a:b"}, nil, "", true},
		{[]string{"/a,upperdir=/x"}, nil, "", true},
		{[]string{"/m"}, []string{"/a\\:b"}, "", true},
	} {
		got, err := LowerDir(c.lower, c.data)
		if got != c.want || (err != nil) != c.err {
			t.Errorf("LowerDir(%q, %q) = %q, %v; want %q, error %v", c.lower, c.data, got, err, c.want, c.err)
		}
	}
}
