package meta

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func rd(n int) string { return "/" + RedirectRoot + "/t/" + string(rune('a'+n)) }

var (
	t0 = time.Date(2024, 2, 29, 12, 34, 56, 123456789, time.UTC)
	t1 = time.Date(1999, 12, 31, 23, 59, 59, 987654321, time.UTC)
)

// lowerEntries is a bottom layer for the whiteout and opaque cases.
func lowerEntries() []Entry {
	return []Entry{
		{Path: "gone", Mode: modeReg | 0o644, Size: 5, Redirect: rd(20)},
		{Path: "opq", Mode: modeDir | 0o755},
		{Path: "opq/old", Mode: modeReg | 0o644},
		{Path: "keep", Mode: modeDir | 0o755},
		{Path: "keep/lowerfile", Mode: modeReg | 0o644, Size: 6, Redirect: rd(21)},
	}
}

// kindEntries is one layer with every kind of entry.
func kindEntries() []Entry {
	return []Entry{
		{Path: ".", Mode: modeDir | 0o755, ModTime: t1},
		{Path: "dir", Mode: modeDir | 0o750, UID: 1000, GID: 1001, ModTime: t0, Xattrs: map[string][]byte{"user.dir": []byte("d")}},
		{Path: "dir/sgid", Mode: modeDir | syscall.S_ISGID | 0o2775, GID: 50, ModTime: t1},
		{Path: "dir/file", Mode: modeReg | 0o644, UID: 1000, GID: 1000, Size: 11, ModTime: t0, Redirect: rd(0),
			Xattrs: map[string][]byte{
				"user.a":                   []byte("b"),
				"trusted.x":                []byte("1"),
				"trusted.overlay.redirect": []byte(rd(1)),
				"trusted.overlay.metacopy": nil,
				"user.overlay.redirect":    []byte(rd(1)),
			}},
		{Path: "dir/ping", Mode: modeReg | 0o755, Size: 4, ModTime: t0, Redirect: rd(2),
			Xattrs: map[string][]byte{"security.capability": capNetRaw}},
		{Path: "dir/suid", Mode: modeReg | syscall.S_ISUID | 0o755, UID: 0, GID: 12, Size: 4, ModTime: t1, Redirect: rd(3)},
		{Path: "dir/empty", Mode: modeReg | 0o600, UID: 5, ModTime: t0, Xattrs: map[string][]byte{"user.e": []byte("f")}},
		{Path: "dir/link", Mode: modeLink | 0o777, UID: 7, GID: 8, ModTime: t1, Linkname: "file",
			Xattrs: map[string][]byte{"security.lazylayer-test": []byte("s"), "user.skipped": []byte("x")}},
		{Path: "dir/abs", Mode: modeLink | 0o777, ModTime: t0, Linkname: "/etc/passwd"},
		{Path: "dir/hard1", Mode: modeReg | 0o640, UID: 3, Size: 5, ModTime: t1, Redirect: rd(4)},
		{Path: "dir/hard2", Link: "dir/hard1"},
		{Path: "hard3", Link: "dir/hard2"},
		{Path: "dev", Mode: modeDir | 0o755, ModTime: t0},
		{Path: "dev/null", Mode: syscall.S_IFCHR | 0o666, Rdev: unix.Mkdev(1, 3), ModTime: t0},
		{Path: "dev/sda", Mode: syscall.S_IFBLK | 0o660, GID: 6, Rdev: unix.Mkdev(8, 0), ModTime: t1},
		{Path: "dev/fifo", Mode: syscall.S_IFIFO | 0o644, ModTime: t0, Xattrs: map[string][]byte{"user.skipped": []byte("x")}},
		{Path: "gone", Mode: syscall.S_IFCHR},
		{Path: "opq", Mode: modeDir | 0o755, Opaque: true, ModTime: t0},
		{Path: "opq/new", Mode: modeReg | 0o644},
		{Path: "keep", Mode: modeDir | 0o755, ModTime: t0, Xattrs: map[string][]byte{"trusted.overlay.opaque": []byte("y")}},
		{Path: "keep/upperfile", Mode: modeReg | 0o644, Xattrs: map[string][]byte{
			"trusted.overlay.metacopy": nil, "trusted.overlay.redirect": []byte(rd(21))}},
	}
}

// kindData is the contents of the non-empty files, by redirect, and which
// data layer holds it.
var kindData = []struct {
	redirect, content string
	local             bool
}{
	{rd(0), "hello world", true},
	{rd(1), "NOT dir/file", false},
	{rd(2), "ping", false},
	{rd(3), "suid", true},
	{rd(4), "hard!", false},
	{rd(20), "gone!", true},
	{rd(21), "lower!", false},
}

type want struct {
	mode     uint32
	uid, gid uint32
	size     int64
	mtime    time.Time
	nlink    uint64 // 0: not checked
	rdev     uint64
	link     string
	content  *string
	xattrs   map[string]string // the exact list through overlay; nil: not checked
}

func str(s string) *string { return &s }

var kindWant = map[string]want{
	".":              {mode: modeDir | 0o755, mtime: t1},
	"dir":            {mode: modeDir | 0o750, uid: 1000, gid: 1001, mtime: t0, xattrs: map[string]string{"user.dir": "d"}},
	"dir/sgid":       {mode: modeDir | 0o2775, gid: 50, mtime: t1, nlink: 2},
	"dir/file":       {mode: modeReg | 0o644, uid: 1000, gid: 1000, size: 11, mtime: t0, nlink: 1, content: str("hello world"), xattrs: map[string]string{"user.a": "b"}},
	"dir/ping":       {mode: modeReg | 0o755, size: 4, mtime: t0, nlink: 1, content: str("ping"), xattrs: map[string]string{"security.capability": string(capNetRaw)}},
	"dir/suid":       {mode: modeReg | 0o4755, gid: 12, size: 4, mtime: t1, nlink: 1, content: str("suid"), xattrs: map[string]string{}},
	"dir/empty":      {mode: modeReg | 0o600, uid: 5, mtime: t0, nlink: 1, content: str(""), xattrs: map[string]string{"user.e": "f"}},
	"dir/link":       {mode: modeLink | 0o777, uid: 7, gid: 8, size: 4, mtime: t1, link: "file", xattrs: map[string]string{"security.lazylayer-test": "s"}},
	"dir/abs":        {mode: modeLink | 0o777, size: 11, mtime: t0, link: "/etc/passwd"},
	"dir/hard1":      {mode: modeReg | 0o640, uid: 3, size: 5, mtime: t1, nlink: 3, content: str("hard!")},
	"dir/hard2":      {mode: modeReg | 0o640, uid: 3, size: 5, mtime: t1, nlink: 3, content: str("hard!")},
	"hard3":          {mode: modeReg | 0o640, uid: 3, size: 5, mtime: t1, nlink: 3, content: str("hard!")},
	"dev/null":       {mode: syscall.S_IFCHR | 0o666, mtime: t0, rdev: unix.Mkdev(1, 3)},
	"dev/sda":        {mode: syscall.S_IFBLK | 0o660, gid: 6, mtime: t1, rdev: unix.Mkdev(8, 0)},
	"dev/fifo":       {mode: syscall.S_IFIFO | 0o644, mtime: t0, xattrs: map[string]string{}},
	"opq/new":        {mode: modeReg | 0o644, content: str("")},
	"keep":           {mode: modeDir | 0o755, mtime: t0, xattrs: map[string]string{}},
	"keep/upperfile": {mode: modeReg | 0o644, content: str("")},
}

// TestTree builds a layer with every kind of entry and checks it through
// overlay, alone over the data layers and stacked on a lower tree.
func TestTree(t *testing.T) {
	s := newStack(t)
	for _, d := range kindData {
		dir := s.remote
		if d.local {
			dir = s.local
		}
		s.put(dir, d.redirect, d.content)
	}
	lower := s.meta(lowerEntries())
	top := s.meta(kindEntries())

	t.Run("tree", func(t *testing.T) { checkTree(t, top) })
	mounts := []struct {
		name  string
		lower []string
		opts  []string
	}{
		{"alone", []string{top}, nil},
		{"stacked", []string{top, lower}, []string{MetacopyOption}},
	}
	for _, m := range mounts {
		t.Run(m.name, func(t *testing.T) {
			mnt := s.mount(m.lower, "", m.opts...)
			for p, w := range kindWant {
				t.Run(p, func(t *testing.T) { checkShown(t, filepath.Join(mnt, p), w) })
			}
			// Hard links are one inode through overlay too.
			if a, b := lstat(t, filepath.Join(mnt, "dir/hard1")), lstat(t, filepath.Join(mnt, "hard3")); a.Ino != b.Ino || a.Dev != b.Dev {
				t.Errorf("hard links: inodes %d:%d and %d:%d", a.Dev, a.Ino, b.Dev, b.Ino)
			}
			if m.name == "stacked" {
				checkStacked(t, mnt)
			}
		})
	}
}

// checkShown compares what overlay shows at p with w.
func checkShown(t *testing.T, p string, w want) {
	st := lstat(t, p)
	if st.Mode != w.mode || st.Uid != w.uid || st.Gid != w.gid {
		t.Errorf("mode %#o uid %d gid %d, want %#o %d %d", st.Mode, st.Uid, st.Gid, w.mode, w.uid, w.gid)
	}
	if w.mode&syscall.S_IFMT != syscall.S_IFDIR && st.Size != w.size {
		t.Errorf("size %d, want %d", st.Size, w.size)
	}
	if got := time.Unix(st.Mtim.Sec, st.Mtim.Nsec); !got.Equal(w.mtime) && !(w.mtime.IsZero() && got.Equal(time.Unix(0, 0))) {
		t.Errorf("mtime %v, want %v", got.UTC(), w.mtime)
	}
	if w.nlink != 0 && uint64(st.Nlink) != w.nlink {
		t.Errorf("nlink %d, want %d", st.Nlink, w.nlink)
	}
	if st.Rdev != w.rdev {
		t.Errorf("rdev %#x, want %#x", st.Rdev, w.rdev)
	}
	if w.link != "" {
		if got, err := os.Readlink(p); err != nil || got != w.link {
			t.Errorf("readlink %q, %v; want %q", got, err, w.link)
		}
	}
	if w.content != nil {
		if got := readFile(t, p); got != *w.content {
			t.Errorf("content %q, want %q", got, *w.content)
		}
	}
	xa := xattrs(t, p)
	if hasTrusted(xa) {
		t.Errorf("overlay shows trusted xattrs: %q", xa)
	}
	if w.xattrs != nil && !sameXattrs(xa, w.xattrs) {
		t.Errorf("xattrs %q, want %q", xa, w.xattrs)
	}
}

func sameXattrs(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

// checkTree looks at the metadata tree itself: metacopy files are sparse
// and carry only the attributes Build generated.
func checkTree(t *testing.T, top string) {
	for _, e := range kindEntries() {
		if e.Link != "" {
			continue
		}
		p := filepath.Join(top, e.Path)
		st := lstat(t, p)
		xa := xattrs(t, p)
		var trusted []string
		for k := range xa {
			if strings.HasPrefix(k, "trusted.") {
				trusted = append(trusted, k)
			}
		}
		switch {
		case e.Mode&syscall.S_IFMT == syscall.S_IFREG && e.Size > 0:
			if hasData(t, p) {
				t.Errorf("%s: has data blocks, want a sparse file", e.Path)
			}
			if len(e.Xattrs) == 0 && st.Blocks != 0 {
				t.Errorf("%s: %d blocks, want none (xattrs in the inode)", e.Path, st.Blocks)
			}
			if v, ok := xa[xattrMetacopy]; !ok || v != "" {
				t.Errorf("%s: metacopy xattr %q, %v", e.Path, v, ok)
			}
			if xa[xattrRedirect] != e.Redirect || len(trusted) != 2 {
				t.Errorf("%s: trusted xattrs %q, want metacopy and redirect %q", e.Path, trusted, e.Redirect)
			}
			if _, ok := xa["user.overlay.redirect"]; ok {
				t.Errorf("%s: kept user.overlay.redirect", e.Path)
			}
		case e.Opaque:
			if xa[xattrOpaque] != "y" || len(trusted) != 1 {
				t.Errorf("%s: trusted xattrs %q, want only opaque", e.Path, trusted)
			}
		default:
			if len(trusted) != 0 {
				t.Errorf("%s: trusted xattrs %q", e.Path, trusted)
			}
		}
		if e.Mode&syscall.S_IFMT != syscall.S_IFLNK {
			if st.Atim != st.Mtim {
				t.Errorf("%s: atime %v, mtime %v", e.Path, st.Atim, st.Mtim)
			}
		}
	}
	if a, b := lstat(t, filepath.Join(top, "dir/hard1")), lstat(t, filepath.Join(top, "hard3")); a.Ino != b.Ino || a.Nlink != 3 {
		t.Errorf("hard links: inodes %d and %d, nlink %d", a.Ino, b.Ino, a.Nlink)
	}
	entries, err := os.ReadDir(filepath.Dir(top))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary directory %s left behind", e.Name())
		}
	}
}

// checkStacked checks what the top layer does to the lower one.
func checkStacked(t *testing.T, mnt string) {
	if _, err := os.Lstat(filepath.Join(mnt, "gone")); !os.IsNotExist(err) {
		t.Errorf("whiteout: gone is visible (%v)", err)
	}
	names := func(dir string) string {
		es, err := os.ReadDir(filepath.Join(mnt, dir))
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range es {
			out = append(out, e.Name())
		}
		return strings.Join(out, ",")
	}
	if got := names("."); strings.Contains(got, "gone") {
		t.Errorf("root lists %s", got)
	}
	if got := names("opq"); got != "new" {
		t.Errorf("opaque directory lists %q, want only new", got)
	}
	// keep's image-supplied trusted.overlay.opaque was dropped: the lower
	// layer shows through.
	if got := names("keep"); got != "lowerfile,upperfile" {
		t.Errorf("keep lists %q, want lowerfile,upperfile", got)
	}
	if got := readFile(t, filepath.Join(mnt, "keep/lowerfile")); got != "lower!" {
		t.Errorf("keep/lowerfile reads %q", got)
	}
}

// hasData reports whether the file at p has any data extent.
func hasData(t *testing.T, p string) bool {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = unix.Seek(int(f.Fd()), 0, unix.SEEK_DATA)
	return err != unix.ENXIO
}
