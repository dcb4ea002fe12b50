package testimage

import (
	"fmt"
	"strings"
	"time"
)

// Paths in the Tricky image that tests look at directly.
const (
	// TrickyBigFile is a 100 MiB file of Random(100, 100<<20) content.
	TrickyBigFile = "/data/big/random-100m"
	// TrickySparseFile is a 32 MiB file of mostly zeros.
	TrickySparseFile = "/data/sparse"
	// TrickyCapFile carries security.capability granting cap_net_bind_service.
	TrickyCapFile = "/data/xattr/netbind"
)

// NetBindServiceCap returns a security.capability xattr value (VFS_CAP
// revision 2, effective) that grants cap_net_bind_service.
func NetBindServiceCap() string {
	// magic_etc = VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, then
	// permitted/inheritable for caps 0-31 and 32-63, all little endian.
	// cap_net_bind_service is bit 10.
	return "\x01\x00\x00\x02" + "\x00\x04\x00\x00" + "\x00\x00\x00\x00" + "\x00\x00\x00\x00" + "\x00\x00\x00\x00"
}

// trickyTime returns the fixed mtime of Tricky layer layer, plus ns
// nanoseconds.
func trickyTime(layer int, ns int) time.Time {
	return time.Date(2023, 6, 1+layer, 12, 0, 0, ns, time.UTC)
}

// Tricky returns the fidelity test image: five layers, alternately gzip,
// zstd and uncompressed, whose merged tree exercises everything a layer
// applier has to get right. All modes, owners and mtimes are fixed.
//
//   - layer 0 (gzip): BaseLayer, so containers can run sh -c.
//   - layer 1 (zstd): /data with user.* xattrs on files and directories and
//     security.capability on TrickyCapFile; an empty file and an empty
//     directory; a group of three hardlinks (/data/hl/one, /data/hl/two,
//     /data/hl/sub/three); relative, absolute, dangling and self-referencing
//     symlinks; a fifo, char devices (1:3 and 300:70000) and a block device
//     (7:0) under /data/devnodes; setuid, setgid, setuid+setgid, sticky and
//     mode-0 entries under /data/modes; owners 1000, 65534, 100000/200000
//     and 3000000000; non-UTF-8 names and a 255-byte name under
//     /data/names; a 20-deep directory chain under /data/deep; nanosecond
//     mtimes; TrickySparseFile; and files and directories the upper layers
//     delete, replace or make opaque.
//   - layer 2 (none): TrickyBigFile.
//   - layer 3 (gzip): whiteouts of /data/gone.txt and /data/gonedir, an
//     opaque /data/opaque with one new file, a file replaced by a directory
//     and a directory replaced by a file, a rewritten /data/hello.txt and a
//     mode-only change of /data/chmod-me.
//   - layer 4 (zstd): a whiteout of /etc/motd from layer 0, a few late
//     files, and what an extraction decides: a name whited out and created
//     again, a name twice (the last wins), user.* xattrs on a symlink and a
//     fifo, trusted.* xattrs (an image-supplied trusted.overlay.opaque on
//     /data/imgopq among them).
func Tricky() Image {
	return Image{
		Layers: []Layer{
			BaseLayer(Gzip),
			{Compression: Zstd, Entries: trickyLayer1()},
			{Compression: None, Entries: trickyLayer2()},
			{Compression: Gzip, Entries: trickyLayer3()},
			{Compression: Zstd, Entries: trickyLayer4()},
		},
		Config: shellConfig(),
	}
}

// dataDir is /data's entry in layer layer; every layer that changes /data
// lists it with the same metadata, as image builders do.
func dataDir(layer int) Entry {
	return Entry{
		Name: "data/", Type: TypeDir, Mode: 0o755, ModTime: trickyTime(layer, 0),
		Xattrs: map[string]string{"user.lazylayer.dir": "data"},
	}
}

func trickyLayer1() []Entry {
	t := trickyTime(1, 0)
	at := func(e Entry) Entry {
		if e.ModTime.IsZero() {
			e.ModTime = t
		}
		return e
	}
	es := []Entry{
		dataDir(1),
		File("data/hello.txt", 0o644, "hello, lower\n"),
		File("data/empty", 0o644, ""),
		Dir("data/emptydir", 0o755),
		File("data/chmod-me", 0o644, "mode changes above\n"),
		BigFile("data/sparse", 0o644, Sparse(32<<20, map[int64][]byte{
			0:             []byte("head"),
			8<<20 + 123:   []byte("middle"),
			32<<20 - 5:    []byte("tail\n"),
			20<<20 + 4096: []byte(strings.Repeat("x", 4096)),
		})),

		// Extended attributes.
		{Name: "data/xattr/", Type: TypeDir, Mode: 0o755, Xattrs: map[string]string{
			"user.dir.a": "first", "user.dir.b": "bin\x00ary\xff",
		}},
		{Name: "data/xattr/file", Type: TypeReg, Mode: 0o644, Content: []byte("has xattrs\n"), Xattrs: map[string]string{
			"user.mime_type": "text/plain", "user.bin": "\x00\x01\x02\xff",
		}},
		{Name: "data/xattr/netbind", Type: TypeReg, Mode: 0o755, Content: []byte("#!/bin/sh\necho bind\n"), Xattrs: map[string]string{
			"security.capability": NetBindServiceCap(),
		}},

		// A hardlink group of three.
		Dir("data/hl", 0o755),
		{Name: "data/hl/one", Type: TypeReg, Mode: 0o640, Uid: 1000, Gid: 1000, Content: []byte("three names, one inode\n"),
			Xattrs: map[string]string{"user.hl": "shared"}},
		Hardlink("data/hl/two", "data/hl/one"),
		Dir("data/hl/sub", 0o755),
		Hardlink("data/hl/sub/three", "data/hl/one"),

		// Symlinks.
		Dir("data/links", 0o755),
		Symlink("data/links/rel", "../hello.txt"),
		Symlink("data/links/abs", "/data/hello.txt"),
		Symlink("data/links/dangling", "nowhere/at/all"),
		Symlink("data/links/dir", "../deep"),
		Symlink("data/links/self", "self"),
		{Name: "data/links/owned", Type: TypeSymlink, Mode: 0o777, Uid: 1000, Gid: 1000, Linkname: "../empty"},

		// Special files.
		Dir("data/devnodes", 0o755),
		{Name: "data/devnodes/fifo", Type: TypeFIFO, Mode: 0o644},
		{Name: "data/devnodes/null", Type: TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3},
		{Name: "data/devnodes/bigminor", Type: TypeChar, Mode: 0o600, Devmajor: 300, Devminor: 70000},
		{Name: "data/devnodes/loop0", Type: TypeBlock, Mode: 0o660, Gid: 6, Devmajor: 7, Devminor: 0},

		// Modes.
		Dir("data/modes", 0o755),
		File("data/modes/setuid", 0o4755, "setuid\n"),
		{Name: "data/modes/setgid", Type: TypeReg, Mode: 0o2755, Gid: 50, Content: []byte("setgid\n")},
		File("data/modes/setuid-setgid", 0o6711, "both\n"),
		File("data/modes/none", 0, "mode 0\n"),
		File("data/modes/all", 0o777, "mode 777\n"),
		Dir("data/modes/sticky", 0o1777),
		{Name: "data/modes/sgid-dir/", Type: TypeDir, Mode: 0o2775, Gid: 50},
		Dir("data/modes/private", 0o700),

		// Owners.
		Dir("data/owners", 0o755),
		{Name: "data/owners/user", Type: TypeReg, Mode: 0o644, Uid: 1000, Gid: 1000, Content: []byte("1000\n")},
		{Name: "data/owners/nobody", Type: TypeReg, Mode: 0o644, Uid: 65534, Gid: 65534, Content: []byte("65534\n")},
		{Name: "data/owners/mixed", Type: TypeReg, Mode: 0o644, Uid: 100000, Gid: 200000, Content: []byte("mixed\n")},
		{Name: "data/owners/huge", Type: TypeReg, Mode: 0o644, Uid: 3000000000, Gid: 3000000001, Content: []byte("huge ids\n")},
		{Name: "data/owners/dir/", Type: TypeDir, Mode: 0o750, Uid: 1000, Gid: 65534},

		// Names.
		Dir("data/names", 0o755),
		File("data/names/caf\xe9-latin1", 0o644, "latin-1 name\n"),
		File("data/names/\xff\xfe-invalid", 0o644, "invalid utf-8 name\n"),
		File("data/names/"+longName(255), 0o644, "255-byte name\n"),
		File("data/names/sp ace\ttab\nnewline", 0o644, "whitespace name\n"),
		File("data/names/ünïcödé", 0o644, "utf-8 name\n"),

		// Nanosecond mtimes.
		Dir("data/times", 0o755),
		{Name: "data/times/ns", Type: TypeReg, Mode: 0o644, ModTime: trickyTime(1, 123456789), Content: []byte("ns\n")},
		{Name: "data/times/old", Type: TypeReg, Mode: 0o644, ModTime: time.Date(1980, 1, 1, 0, 0, 1, 0, time.UTC), Content: []byte("old\n")},
		{Name: "data/times/link", Type: TypeSymlink, Mode: 0o777, ModTime: trickyTime(1, 987654321), Linkname: "ns"},

		// Things the upper layers change.
		File("data/gone.txt", 0o644, "deleted by layer 3\n"),
		Dir("data/gonedir", 0o755),
		File("data/gonedir/x", 0o644, "x\n"),
		Dir("data/gonedir/sub", 0o755),
		File("data/gonedir/sub/y", 0o644, "y\n"),
		Dir("data/opaque", 0o755),
		File("data/opaque/a", 0o644, "hidden by opaque\n"),
		Dir("data/opaque/sub", 0o755),
		File("data/opaque/sub/b", 0o644, "hidden by opaque\n"),
		File("data/file2dir", 0o644, "becomes a directory\n"),
		Dir("data/dir2file", 0o755),
		File("data/dir2file/x", 0o644, "parent becomes a file\n"),
		Dir("data/imgopq", 0o755),
		File("data/imgopq/lower", 0o644, "an image-supplied opaque xattr above must not hide this\n"),
	}
	es = append(es, deepChain("data/deep", 20)...)
	for i := range es {
		es[i] = at(es[i])
	}
	return es
}

// longName returns a file name of exactly n bytes.
func longName(n int) string {
	s := "long-name-"
	return s + strings.Repeat("n", n-len(s))
}

// deepChain returns the directory root and depth nested directories below
// it, with a file in the deepest.
func deepChain(root string, depth int) []Entry {
	es := []Entry{Dir(root, 0o755)}
	p := root
	for i := 1; i <= depth; i++ {
		p = fmt.Sprintf("%s/d%02d", p, i)
		es = append(es, Dir(p, 0o755))
	}
	return append(es, File(p+"/leaf", 0o644, fmt.Sprintf("depth %d\n", depth)))
}

func trickyLayer2() []Entry {
	t := trickyTime(2, 0)
	return []Entry{
		dataDir(2),
		{Name: "data/big/", Type: TypeDir, Mode: 0o755, ModTime: t},
		{Name: "data/big/random-100m", Type: TypeReg, Mode: 0o644, ModTime: t, Body: Random(100, 100<<20)},
	}
}

func trickyLayer3() []Entry {
	t := trickyTime(3, 0)
	es := []Entry{
		dataDir(3),
		Whiteout("data/gone.txt"),
		Whiteout("data/gonedir"),
		Dir("data/opaque", 0o755),
		Opaque("data/opaque"),
		File("data/opaque/new.txt", 0o644, "only file left in opaque\n"),
		Dir("data/file2dir", 0o755),
		File("data/file2dir/child", 0o644, "was a file below\n"),
		File("data/dir2file", 0o644, "was a directory below\n"),
		File("data/hello.txt", 0o644, "hello, upper\n"),
		File("data/chmod-me", 0o600, "mode changes above\n"),
	}
	for i := range es {
		if es[i].ModTime.IsZero() {
			es[i].ModTime = t
		}
	}
	return es
}

func trickyLayer4() []Entry {
	t := trickyTime(4, 0)
	return []Entry{
		{Name: "etc/", Type: TypeDir, Mode: 0o755, ModTime: t},
		{Name: "etc/.wh.motd", Type: TypeReg, ModTime: t},
		{Name: "etc/os-release", Type: TypeReg, Mode: 0o644, ModTime: t, Content: []byte("NAME=lazylayer-tricky\nID=lazylayer\n")},
		dataDir(4),
		{Name: "data/late/", Type: TypeDir, Mode: 0o755, ModTime: trickyTime(4, 5)},
		{Name: "data/late/file", Type: TypeReg, Mode: 0o644, ModTime: trickyTime(4, 999999999), Content: []byte("added last\n")},

		// What an extraction decides, that a TOC reader must decide the
		// same way: a name whited out and created again in one layer; a
		// name that appears twice (the last entry wins); user.* xattrs on
		// a symlink and a fifo (Linux refuses them there); trusted.*
		// xattrs from the image, overlay's own among them.
		{Name: "data/late/.wh.twice", Type: TypeReg, ModTime: t},
		{Name: "data/late/twice", Type: TypeReg, Mode: 0o644, ModTime: trickyTime(4, 250000000), Content: []byte("created after its whiteout\n")},
		{Name: "data/late/dup", Type: TypeReg, Mode: 0o644, ModTime: trickyTime(4, 1), Content: []byte("first\n")},
		{Name: "data/late/dup", Type: TypeReg, Mode: 0o600, ModTime: trickyTime(4, 2), Content: []byte("second, wins\n")},
		{Name: "data/late/ulink", Type: TypeSymlink, Mode: 0o777, ModTime: trickyTime(4, 3), Linkname: "file",
			Xattrs: map[string]string{"user.on": "symlink"}},
		{Name: "data/late/ufifo", Type: TypeFIFO, Mode: 0o644, ModTime: trickyTime(4, 4),
			Xattrs: map[string]string{"user.on": "fifo"}},
		{Name: "data/late/trusted", Type: TypeReg, Mode: 0o644, ModTime: t, Content: []byte("trusted xattrs\n"),
			Xattrs: map[string]string{"trusted.lazylayer.t": "x", "user.ok": "y"}},
		{Name: "data/imgopq/", Type: TypeDir, Mode: 0o755, ModTime: t,
			Xattrs: map[string]string{"trusted.overlay.opaque": "y"}},
	}
}
