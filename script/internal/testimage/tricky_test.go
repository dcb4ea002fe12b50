package testimage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/script/internal/treecmp"
)

// applyImage applies img's layers in order to root with containerd's own
// applier, the reference the snapshotter is compared against.
func applyImage(ctx context.Context, t *testing.T, root string, img Image) {
	t.Helper()
	for i, l := range img.Layers {
		pr, pw := io.Pipe()
		go func() {
			if l.Raw != nil {
				_, err := pw.Write(l.Raw)
				pw.CloseWithError(err)
				return
			}
			pw.CloseWithError(WriteTar(pw, l.Entries))
		}()
		_, err := archive.Apply(ctx, root, pr)
		pr.CloseWithError(io.ErrClosedPipe) // unblock the writer if Apply stopped early
		if err != nil {
			t.Fatalf("apply layer %d: %v", i, err)
		}
	}
}

func bodySum(t *testing.T, b Body) string {
	t.Helper()
	r, _, err := b.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestTrickyApplies applies Tricky with containerd's applier and checks the
// merged tree holds what Tricky's documentation promises.
func TestTrickyApplies(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: chown, mknod, security.capability")
	}
	root := t.TempDir()
	applyImage(t.Context(), t, root, Tricky())
	s, err := treecmp.Snapshot(t.Context(), root)
	if err != nil {
		t.Fatal(err)
	}

	for _, p := range []string{"/data/gone.txt", "/data/gonedir", "/data/gonedir/x", "/data/opaque/a", "/data/opaque/sub", "/etc/motd"} {
		if _, ok := s[p]; ok {
			t.Errorf("%q should have been deleted by an upper layer", p)
		}
	}
	for _, p := range []string{"/data/opaque/new.txt", "/data/file2dir/child", "/data/names/caf\xe9-latin1",
		"/data/names/\xff\xfe-invalid", "/data/names/" + longName(255), "/data/deep/d01/d02/d03/d04/d05/d06/d07/d08/d09/d10/d11/d12/d13/d14/d15/d16/d17/d18/d19/d20/leaf",
		"/data/late/file", "/etc/os-release", "/proc", "/sys", "/dev", "/tmp"} {
		if _, ok := s[p]; !ok {
			t.Errorf("%q missing", p)
		}
	}

	type want struct {
		mode     uint32
		uid, gid uint32
	}
	for p, w := range map[string]want{
		"/data/modes/setuid":        {unix.S_IFREG | 0o4755, 0, 0},
		"/data/modes/setgid":        {unix.S_IFREG | 0o2755, 0, 50},
		"/data/modes/setuid-setgid": {unix.S_IFREG | 0o6711, 0, 0},
		"/data/modes/none":          {unix.S_IFREG, 0, 0},
		"/data/modes/sticky":        {unix.S_IFDIR | 0o1777, 0, 0},
		"/data/modes/sgid-dir":      {unix.S_IFDIR | 0o2775, 0, 50},
		"/data/owners/huge":         {unix.S_IFREG | 0o644, 3000000000, 3000000001},
		"/data/owners/mixed":        {unix.S_IFREG | 0o644, 100000, 200000},
		"/data/links/owned":         {unix.S_IFLNK | 0o777, 1000, 1000},
		"/data/devnodes/fifo":       {unix.S_IFIFO | 0o644, 0, 0},
		"/data/devnodes/loop0":      {unix.S_IFBLK | 0o660, 0, 6},
		"/data/dir2file":            {unix.S_IFREG | 0o644, 0, 0},
		"/data/file2dir":            {unix.S_IFDIR | 0o755, 0, 0},
		"/data/chmod-me":            {unix.S_IFREG | 0o600, 0, 0},
		"/tmp":                      {unix.S_IFDIR | 0o1777, 0, 0},
	} {
		if i := s[p]; i.Mode != w.mode || i.Uid != w.uid || i.Gid != w.gid {
			t.Errorf("%q: mode %o %d:%d, want %o %d:%d", p, i.Mode, i.Uid, i.Gid, w.mode, w.uid, w.gid)
		}
	}

	if i := s["/data/devnodes/bigminor"]; unix.Major(i.Rdev) != 300 || unix.Minor(i.Rdev) != 70000 {
		t.Errorf("bigminor rdev %d:%d", unix.Major(i.Rdev), unix.Minor(i.Rdev))
	}
	one, two, three := s["/data/hl/one"], s["/data/hl/two"], s["/data/hl/sub/three"]
	if one.Ino != two.Ino || one.Ino != three.Ino || one.Nlink != 3 || one.Xattrs["user.hl"] != "shared" {
		t.Errorf("hardlink group: %+v %+v %+v", one, two, three)
	}
	if got := s[TrickyCapFile].Xattrs["security.capability"]; got != NetBindServiceCap() {
		t.Errorf("security.capability = %q", got)
	}
	if got := s["/data/xattr"].Xattrs["user.dir.b"]; got != "bin\x00ary\xff" {
		t.Errorf("dir xattr = %q", got)
	}
	if got := s["/data"].Xattrs["user.lazylayer.dir"]; got != "data" {
		t.Errorf("/data xattr = %q", got)
	}
	for p, target := range map[string]string{
		"/data/links/rel": "../hello.txt", "/data/links/abs": "/data/hello.txt",
		"/data/links/dangling": "nowhere/at/all", "/data/links/self": "self", "/bin/sh": "busybox",
	} {
		if got := s[p].Target; got != target {
			t.Errorf("%q -> %q, want %q", p, got, target)
		}
	}
	for p, mtime := range map[string]time.Time{
		"/data/times/ns":   trickyTime(1, 123456789),
		"/data/times/link": trickyTime(1, 987654321),
		"/data/times/old":  time.Date(1980, 1, 1, 0, 0, 1, 0, time.UTC),
		"/data/late":       trickyTime(4, 5),
		"/data":            trickyTime(4, 0),
	} {
		if got := s[p].Mtime; !got.Equal(mtime) {
			t.Errorf("%q: mtime %v, want %v", p, got, mtime)
		}
	}
	for p, i := range s {
		if p != "/" && i.Mtime.After(DefaultModTime()) {
			t.Errorf("%q: mtime %v is not a fixed one", p, i.Mtime)
		}
	}
	if i := s[TrickyBigFile]; i.Size != 100<<20 || i.SHA256 != bodySum(t, Random(100, 100<<20)) {
		t.Errorf("big file: size %d", i.Size)
	}
	if i := s[TrickySparseFile]; i.Size != 32<<20 {
		t.Errorf("sparse file: size %d", i.Size)
	}
	if got, err := os.ReadFile(root + "/data/hello.txt"); err != nil || string(got) != "hello, upper\n" {
		t.Errorf("/data/hello.txt = %q, %v", got, err)
	}

	// The base layer runs a shell.
	cmd := exec.CommandContext(t.Context(), "/bin/sh", "-c", "cat /data/opaque/new.txt; ls /data/opaque")
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root}
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/bin"}
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "only file left in opaque\nnew.txt" {
		t.Errorf("sh in the tree: %q, %v", out, err)
	}
}
