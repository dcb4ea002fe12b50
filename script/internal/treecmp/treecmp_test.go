package treecmp

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// node is one path of a test tree. Nodes are created in order, so parents
// come first.
type node struct {
	path   string // relative to the tree root
	kind   uint32 // unix.S_IFREG, S_IFDIR, ...
	mode   uint32 // permission, setuid, setgid and sticky bits
	uid    int
	gid    int
	data   string
	big    int64  // if > 0, the file has big bytes of bigByte(i) content
	bigEnd byte   // xored into the last byte of a big file
	target string // symlink target
	linkTo string // if set, the node is a hardlink to this earlier path
	xattrs map[string]string
	rdev   uint64
	mtime  time.Time
}

func bigByte(i int64) byte { return byte(i*7 + i>>12) }

// capNetBind is a valid VFS_CAP_REVISION_2 security.capability value.
const capNetBind = "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

func at(sec, ns int) time.Time { return time.Date(2023, 5, 6, 7, 8, sec, ns, time.UTC) }

// baseTree returns a tree with one of each kind of thing Compare checks.
func baseTree() []node {
	linked := node{kind: unix.S_IFREG, mode: 0o640, uid: 7, gid: 8, data: "linked", mtime: at(9, 0),
		xattrs: map[string]string{"user.hl": "yes"}}
	h1, solo := linked, linked
	h1.path, solo.path = "d/h1", "d/solo"
	return []node{
		{path: "d", kind: unix.S_IFDIR, mode: 0o755, mtime: at(1, 0)},
		{path: "d/f", kind: unix.S_IFREG, mode: 0o644, data: "hello", mtime: at(2, 5)},
		{path: "d/g", kind: unix.S_IFREG, mode: 0o600, uid: 1000, gid: 1000, data: "world", mtime: at(3, 0)},
		{path: "d/big", kind: unix.S_IFREG, mode: 0o644, big: 12<<20 + 17, mtime: at(4, 0)},
		{path: "d/link", kind: unix.S_IFLNK, target: "f", mtime: at(5, 999999999)},
		{path: "d/sub", kind: unix.S_IFDIR, mode: 0o750, mtime: at(6, 0), xattrs: map[string]string{"user.dir": "x"}},
		{path: "d/sub/x", kind: unix.S_IFREG, mode: 0o755, data: "x", mtime: at(7, 0),
			xattrs: map[string]string{"user.a": "1", "security.capability": capNetBind, "trusted.t": "\x00bin"}},
		{path: "d/empty", kind: unix.S_IFREG, mode: 0o644, mtime: at(8, 0)},
		h1,
		{path: "d/h2", linkTo: "d/h1"},
		{path: "d/h3", linkTo: "d/h1"},
		solo,
		{path: "d/fifo", kind: unix.S_IFIFO, mode: 0o644, mtime: at(10, 0)},
		{path: "d/null", kind: unix.S_IFCHR, mode: 0o666, rdev: unix.Mkdev(1, 3), mtime: at(11, 0)},
		{path: "d/loop", kind: unix.S_IFBLK, mode: 0o660, gid: 6, rdev: unix.Mkdev(7, 0), mtime: at(12, 0)},
		{path: "d/caf\xe9", kind: unix.S_IFREG, mode: 0o644, data: "latin-1", mtime: at(13, 0)},
		{path: "d/" + strings.Repeat("n", 255), kind: unix.S_IFREG, mode: 0o644, data: "long", mtime: at(14, 0)},
		{path: "d/sticky", kind: unix.S_IFDIR, mode: 0o1777, mtime: at(15, 0)},
		{path: "d/suid", kind: unix.S_IFREG, mode: 0o4755, data: "suid", mtime: at(16, 0)},
	}
}

// build creates nodes under root, then fixes every mode, owner, xattr and
// mtime (mtimes last, deepest first, so creating children does not move
// them).
func build(t *testing.T, root string, nodes []node) {
	t.Helper()
	for _, n := range nodes {
		p := filepath.Join(root, n.path)
		var err error
		switch {
		case n.linkTo != "":
			err = os.Link(filepath.Join(root, n.linkTo), p)
		case n.kind == unix.S_IFDIR:
			err = os.Mkdir(p, 0o700)
		case n.kind == unix.S_IFREG:
			err = os.WriteFile(p, content(n), 0o600)
		case n.kind == unix.S_IFLNK:
			err = os.Symlink(n.target, p)
		default:
			err = unix.Mknod(p, n.kind|0o600, int(n.rdev))
		}
		if err != nil {
			t.Fatalf("create %q: %v", n.path, err)
		}
	}
	for _, n := range nodes {
		if n.linkTo != "" {
			continue // the inode's attributes come from the link target
		}
		p := filepath.Join(root, n.path)
		if err := os.Lchown(p, n.uid, n.gid); err != nil {
			t.Fatal(err)
		}
		if n.kind != unix.S_IFLNK {
			if err := unix.Chmod(p, n.mode); err != nil {
				t.Fatal(err)
			}
		}
		for k, v := range n.xattrs {
			if err := unix.Lsetxattr(p, k, []byte(v), 0); err != nil {
				t.Fatalf("setxattr %s on %q: %v", k, n.path, err)
			}
		}
	}
	for _, n := range slices.Backward(nodes) {
		if n.linkTo != "" {
			continue
		}
		setMtime(t, filepath.Join(root, n.path), n.mtime)
	}
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	setMtime(t, root, at(0, 0))
}

func setMtime(t *testing.T, p string, mtime time.Time) {
	t.Helper()
	ts := []unix.Timespec{unix.NsecToTimespec(mtime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		t.Fatalf("set mtime of %s: %v", p, err)
	}
}

func content(n node) []byte {
	if n.big == 0 {
		return []byte(n.data)
	}
	b := make([]byte, n.big)
	for i := range b {
		b[i] = bigByte(int64(i))
	}
	b[len(b)-1] ^= n.bigEnd
	return b
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: chown, mknod and trusted.* xattrs")
	}
}

// edit returns a mutation that changes the node at path with f.
func edit(path string, f func(*node)) func([]node) []node {
	return func(ns []node) []node {
		for i := range ns {
			if ns[i].path == path {
				f(&ns[i])
				return ns
			}
		}
		panic("no node " + path)
	}
}

func remove(path string) func([]node) []node {
	return func(ns []node) []node {
		return slices.DeleteFunc(ns, func(n node) bool { return n.path == path })
	}
}

func TestCompare(t *testing.T) {
	requireRoot(t)
	long := "d/" + strings.Repeat("n", 255)
	tests := []struct {
		name   string
		mutate func([]node) []node
		want   []string
	}{
		{"identical", nil, nil},
		{"missing", remove("d/g"), []string{`"/d/g": only in a (regular file)`}},
		{"extra", func(ns []node) []node {
			return append(ns, node{path: "d/new", kind: unix.S_IFIFO, mode: 0o600, mtime: at(1, 0)})
		}, []string{`"/d/new": only in b (fifo)`}},
		{"file to dir", edit("d/f", func(n *node) { n.kind = unix.S_IFDIR }),
			[]string{`"/d/f": type regular file != directory`}},
		{"file to fifo", edit("d/g", func(n *node) { n.kind = unix.S_IFIFO }),
			[]string{`"/d/g": type regular file != fifo`}},
		{"char to block", edit("d/null", func(n *node) { n.kind = unix.S_IFBLK }),
			[]string{`"/d/null": type char device != block device`}},
		{"perm", edit("d/f", func(n *node) { n.mode = 0o640 }), []string{`"/d/f": mode 0644 != 0640`}},
		{"setuid", edit("d/g", func(n *node) { n.mode |= unix.S_ISUID }), []string{`"/d/g": mode 0600 != 4600`}},
		{"setgid dir", edit("d/sub", func(n *node) { n.mode |= unix.S_ISGID }), []string{`"/d/sub": mode 0750 != 2750`}},
		{"sticky", edit("d/sticky", func(n *node) { n.mode = 0o777 }), []string{`"/d/sticky": mode 1777 != 0777`}},
		{"uid", edit("d/g", func(n *node) { n.uid = 1001 }), []string{`"/d/g": uid 1000 != 1001`}},
		{"gid", edit("d/loop", func(n *node) { n.gid = 0 }), []string{`"/d/loop": gid 6 != 0`}},
		{"symlink owner", edit("d/link", func(n *node) { n.uid = 5 }), []string{`"/d/link": uid 0 != 5`}},
		{"size", edit("d/f", func(n *node) { n.data = "hello!" }), []string{`"/d/f": size 5 != 6`}},
		{"content", edit("d/f", func(n *node) { n.data = "jello" }), []string{
			`"/d/f": content sha256 ` + sum("hello") + ` != ` + sum("jello")}},
		{"big content", edit("d/big", func(n *node) { n.bigEnd = 1 }), []string{`"/d/big": content sha256 ` +
			sum(string(content(node{big: 12<<20 + 17}))) + ` != ` + sum(string(content(node{big: 12<<20 + 17, bigEnd: 1})))}},
		{"symlink target", edit("d/link", func(n *node) { n.target = "g" }), []string{`"/d/link": symlink target "f" != "g"`}},
		{"device", edit("d/null", func(n *node) { n.rdev = unix.Mkdev(1, 5) }), []string{`"/d/null": device 1:3 != 1:5`}},
		{"xattr value", edit("d/sub/x", func(n *node) {
			n.xattrs = map[string]string{"user.a": "2", "security.capability": capNetBind, "trusted.t": "\x00bin"}
		}),
			[]string{`"/d/sub/x": xattr user.a "1" != "2"`}},
		{"xattr missing", edit("d/sub/x", func(n *node) { n.xattrs = map[string]string{"user.a": "1", "trusted.t": "\x00bin"} }),
			[]string{`"/d/sub/x": xattr security.capability only in a ("\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")`}},
		{"trusted xattr", edit("d/f", func(n *node) { n.xattrs = map[string]string{"trusted.overlay.opaque": "y"} }),
			[]string{`"/d/f": xattr trusted.overlay.opaque only in b ("y")`}},
		{"dir xattr", edit("d/sub", func(n *node) { n.xattrs = nil }), []string{`"/d/sub": xattr user.dir only in a ("x")`}},
		{"symlink xattr", edit("d/link", func(n *node) { n.xattrs = map[string]string{"trusted.l": "1"} }),
			[]string{`"/d/link": xattr trusted.l only in b ("1")`}},
		{"mtime ns", edit("d/f", func(n *node) { n.mtime = at(2, 6) }),
			[]string{`"/d/f": mtime 2023-05-06T07:08:02.000000005Z != 2023-05-06T07:08:02.000000006Z`}},
		{"dir mtime", edit("d/sub", func(n *node) { n.mtime = at(6, 1000) }),
			[]string{`"/d/sub": mtime 2023-05-06T07:08:06Z != 2023-05-06T07:08:06.000001Z`}},
		{"symlink mtime", edit("d/link", func(n *node) { n.mtime = at(5, 0) }),
			[]string{`"/d/link": mtime 2023-05-06T07:08:05.999999999Z != 2023-05-06T07:08:05Z`}},
		{"non-utf8 name", edit("d/caf\xe9", func(n *node) { n.data = "latin-2" }), []string{
			`"/d/caf\xe9": content sha256 ` + sum("latin-1") + ` != ` + sum("latin-2")}},
		{"255-byte name", edit(long, func(n *node) { n.mode = 0o600 }), []string{`"/` + long + `": mode 0644 != 0600`}},
		{"hardlink broken", edit("d/h3", func(n *node) {
			n.linkTo, n.kind, n.mode, n.uid, n.gid, n.data, n.mtime = "", unix.S_IFREG, 0o640, 7, 8, "linked", at(9, 0)
			n.xattrs = map[string]string{"user.hl": "yes"}
		}), []string{`"/d/h1": hardlinks differ: a ["/d/h1" "/d/h2" "/d/h3"], b ["/d/h1" "/d/h2"] ["/d/h3"]`}},
		{"hardlinks regrouped", func(ns []node) []node {
			// Move solo before h3 and link h3 to it instead of h1.
			ns = remove("d/h3")(ns)
			return append(ns, node{path: "d/h3", linkTo: "d/solo"})
		}, []string{`"/d/h1": hardlinks differ: a ["/d/h1" "/d/h2" "/d/h3"] ["/d/solo"], b ["/d/h1" "/d/h2"] ["/d/h3" "/d/solo"]`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
			for _, d := range []string{a, b} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			build(t, a, baseTree())
			nb := baseTree()
			if tc.mutate != nil {
				nb = tc.mutate(nb)
			}
			build(t, b, nb)
			got, err := Compare(t.Context(), a, b)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("Compare:\n got %q\nwant %q", got, tc.want)
			}
		})
	}
}

func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func TestSnapshotInfo(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	build(t, root, baseTree())
	s, err := Snapshot(t.Context(), root)
	if err != nil {
		t.Fatal(err)
	}
	if len(s) != len(baseTree())+1 {
		t.Errorf("snapshot has %d paths, want %d", len(s), len(baseTree())+1)
	}
	check := func(p string, ok bool, what string) {
		t.Helper()
		if !ok {
			t.Errorf("%q: %s: %+v", p, what, s[p])
		}
	}
	check("/", s["/"].Type() == unix.S_IFDIR && s["/"].Mode&0o7777 == 0o755, "root")
	check("/d/suid", s["/d/suid"].Mode == unix.S_IFREG|0o4755, "mode")
	check("/d/sticky", s["/d/sticky"].Mode == unix.S_IFDIR|0o1777, "mode")
	check("/d/f", s["/d/f"].SHA256 == sum("hello") && s["/d/f"].Size == 5 && s["/d/f"].Mtime.Equal(at(2, 5)), "content")
	check("/d/big", s["/d/big"].Size == 12<<20+17, "size")
	check("/d/link", s["/d/link"].Target == "f" && s["/d/link"].Mtime.Equal(at(5, 999999999)), "symlink")
	check("/d/null", unix.Major(s["/d/null"].Rdev) == 1 && unix.Minor(s["/d/null"].Rdev) == 3, "rdev")
	x := s["/d/sub/x"].Xattrs
	check("/d/sub/x", len(x) == 3 && x["security.capability"] == capNetBind && x["trusted.t"] == "\x00bin", "xattrs")
	check("/d/h2", s["/d/h2"].Ino == s["/d/h1"].Ino && s["/d/h1"].Nlink == 3, "hardlink")
	check("/d/g", s["/d/g"].Uid == 1000 && s["/d/g"].Gid == 1000, "owner")
	check("/d/caf\xe9", s["/d/caf\xe9"].SHA256 == sum("latin-1"), "non-utf8 name")
}

func TestOptions(t *testing.T) {
	requireRoot(t)
	a, b := t.TempDir(), t.TempDir()
	build(t, a, baseTree())
	nb := edit("d/sub/x", func(n *node) { n.xattrs = map[string]string{"user.a": "1"} })(baseTree())
	nb = edit("d/sub", func(n *node) { n.mode = 0o700 })(nb)
	build(t, b, nb)
	o := Options{
		Skip:        func(p string) bool { return p == "/d/sub" },
		IgnoreXattr: func(name string) bool { return strings.HasPrefix(name, "user.") },
	}
	got, err := o.Compare(t.Context(), a, b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 0 {
		t.Errorf("Compare with Skip: %q", got)
	}
	s, err := o.Snapshot(t.Context(), a)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s["/d/sub/x"]; ok {
		t.Error("Skip did not skip the subtree")
	}
	if x := s["/d/h1"].Xattrs; x != nil {
		t.Errorf("IgnoreXattr kept %q", x)
	}
}

// TestDeep builds a chain of 20 directories with 255-byte names (a path
// longer than PATH_MAX) with openat and checks a difference at the bottom
// is found.
func TestDeep(t *testing.T) {
	mk := func(root string, leaf string) {
		fds := []int{}
		fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
		for i := range 20 {
			name := strings.Repeat(string(rune('a'+i)), 255)
			if err := unix.Mkdirat(fd, name, 0o755); err != nil {
				t.Fatal(err)
			}
			if fd, err = unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY, 0); err != nil {
				t.Fatal(err)
			}
			fds = append(fds, fd)
		}
		ffd, err := unix.Openat(fd, "leaf", unix.O_WRONLY|unix.O_CREAT, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		unix.Write(ffd, []byte(leaf))
		unix.Close(ffd)
		ts := []unix.Timespec{{Sec: 1}, {Sec: 1}}
		for i := len(fds) - 1; i >= 0; i-- {
			if err := unix.UtimesNanoAt(fds[i], ".", ts, 0); err != nil {
				t.Fatal(err)
			}
			if i == len(fds)-1 {
				unix.UtimesNanoAt(fds[i], "leaf", ts, 0)
			}
			unix.Close(fds[i])
		}
	}
	a, b := t.TempDir(), t.TempDir()
	mk(a, "same")
	mk(b, "diff")
	got, err := Compare(t.Context(), a, b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || !strings.Contains(got[0], "content sha256") || len(got[0]) < 20*256 {
		t.Errorf("Compare of deep trees: %q", got)
	}
	s, err := Snapshot(t.Context(), a)
	if err != nil {
		t.Fatal(err)
	}
	if len(s) != 22 {
		t.Errorf("deep snapshot has %d paths, want 22", len(s))
	}
	deepest := 0
	for k := range s {
		if strings.HasSuffix(k, "/leaf") {
			deepest = strings.Count(k, "/")
		}
	}
	if deepest != 21 {
		t.Errorf("leaf recorded at depth %d, want 21", deepest)
	}
}
