package meta

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestHostile: layers that would write outside the tree, through a link the
// image made, or into lazylayer's redirect namespace are refused whole, and
// nothing is left behind.
func TestHostile(t *testing.T) {
	requireRoot(t)
	ok := "/" + RedirectRoot + "/k/1"
	dir := func(p string) Entry { return Entry{Path: p, Mode: modeDir | 0o755} }
	for _, c := range []struct {
		name    string
		entries []Entry
		err     string
	}{
		{"dotdot", []Entry{file("../etc/passwd", ok, 1)}, "leaves the layer"},
		{"dotdot only", []Entry{{Path: "..", Mode: modeDir | 0o755}}, "leaves the layer"},
		{"dotdot inside", []Entry{dir("a"), file("a/../../x", ok, 1)}, "not clean"},
		{"absolute", []Entry{file("/etc/passwd", ok, 1)}, "absolute"},
		{"trailing slash", []Entry{dir("a/")}, "not clean"},
		{"nul", []Entry{file("a\x00b", ok, 1)}, "NUL"},
		{"long name", []Entry{file(strings.Repeat("x", 256), ok, 1)}, "name of 256 bytes"},
		{"symlink parent", []Entry{
			{Path: "a", Mode: modeLink | 0o777, Linkname: "/etc"},
			file("a/passwd", ok, 1),
		}, "not a directory"},
		{"file parent", []Entry{file("a", ok, 1), {Path: "a/b", Mode: modeReg}}, "not a directory"},
		{"hard link parent", []Entry{dir("d"), {Path: "e", Link: "d"}, {Path: "e/f", Mode: modeReg}}, "not a directory"},
		{"missing parent", []Entry{{Path: "x/y", Mode: modeReg}}, "not in the layer"},
		{"twice", []Entry{{Path: "a", Mode: modeReg}, {Path: "a", Mode: modeReg}}, "twice"},
		{"root twice", []Entry{dir("."), {Path: "", Mode: modeDir}}, "twice"},
		{"root not a directory", []Entry{{Path: ".", Mode: modeReg}}, "root must be a directory"},
		{"reserved name", []Entry{dir(RedirectRoot), file(RedirectRoot+"/k", ok, 1)}, "reserved"},
		{"reserved name, file", []Entry{{Path: RedirectRoot, Mode: modeReg}}, "reserved"},
		{"redirect outside", []Entry{file("f", "/etc/passwd", 1)}, "not under"},
		{"redirect relative", []Entry{file("f", RedirectRoot+"/k/1", 1)}, "not under"},
		{"redirect dotdot", []Entry{file("f", "/"+RedirectRoot+"/../etc/passwd", 1)}, "not a clean path"},
		{"redirect root itself", []Entry{file("f", "/"+RedirectRoot+"/", 1)}, "not under"},
		{"redirect too long", []Entry{file("f", "/"+RedirectRoot+"/"+strings.Repeat("k", 250), 1)}, "more than overlay's"},
		{"redirect missing", []Entry{file("f", "", 1)}, "without a redirect"},
		{"redirect on empty file", []Entry{file("f", ok, 0)}, "not a non-empty regular file"},
		{"redirect on directory", []Entry{{Path: "d", Mode: modeDir | 0o755, Redirect: ok}}, "not a non-empty regular file"},
		{"redirect twice", []Entry{file("a", ok, 1), file("b", ok, 1)}, "same redirect"},
		{"hard link to directory", []Entry{dir("d"), {Path: "l", Link: "d"}}, "to directory"},
		{"hard link to root", []Entry{{Path: "l", Link: "."}}, "to directory"},
		{"hard link loop", []Entry{{Path: "a", Link: "b"}, {Path: "b", Link: "a"}}, "not in the layer"},
		{"hard link through symlink", []Entry{
			{Path: "etc", Mode: modeLink | 0o777, Linkname: "/etc"},
			{Path: "x", Link: "etc/passwd"},
		}, "not in the layer"},
		{"hard link outside", []Entry{{Path: "a", Link: "../../etc/passwd"}}, "not in the layer"},
		{"socket", []Entry{{Path: "s", Mode: syscall.S_IFSOCK | 0o755}}, "unsupported file type"},
		{"no type", []Entry{{Path: "s", Mode: 0o755}}, "unsupported file type"},
		{"unknown mode bits", []Entry{{Path: "s", Mode: modeReg | 0o200000}}, "unknown bits"},
		{"negative size", []Entry{{Path: "f", Mode: modeReg, Size: -1}}, "size"},
		{"sized directory", []Entry{{Path: "d", Mode: modeDir, Size: 4096}}, "size"},
		{"opaque file", []Entry{{Path: "f", Mode: modeReg, Opaque: true}}, "opaque"},
		{"empty symlink", []Entry{{Path: "l", Mode: modeLink | 0o777}}, "symlink target"},
		{"xattr name with NUL", []Entry{{Path: "f", Mode: modeReg, Xattrs: map[string][]byte{"user.a\x00b": nil}}}, "xattr name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			parent := t.TempDir()
			dst := filepath.Join(parent, "meta")
			err := Build(t.Context(), dst, c.entries)
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Fatalf("Build: %v, want an error containing %q", err, c.err)
			}
			left, rerr := os.ReadDir(parent)
			if rerr != nil {
				t.Fatal(rerr)
			}
			if len(left) != 0 {
				t.Errorf("left behind: %v", left)
			}
		})
	}
}

// TestBuildFailsClean: an error from the file system while writing leaves
// nothing, and Build never replaces an existing tree.
func TestBuildFailsClean(t *testing.T) {
	requireRoot(t)
	parent := t.TempDir()
	dst := filepath.Join(parent, "meta")
	bad := []Entry{{Path: "f", Mode: modeReg, Xattrs: map[string][]byte{"user." + strings.Repeat("x", 300): nil}}}
	if err := Build(t.Context(), dst, bad); err == nil {
		t.Fatal("Build set an xattr with a 305-byte name")
	}
	if left, _ := os.ReadDir(parent); len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}
	if err := Build(t.Context(), dst, nil); err != nil {
		t.Fatal(err)
	}
	if err := Build(t.Context(), dst, []Entry{{Path: "f", Mode: modeReg}}); err == nil {
		t.Error("Build replaced an existing tree")
	}
	if left, _ := os.ReadDir(parent); len(left) != 1 {
		t.Errorf("left behind: %v", left)
	}
	if _, err := os.Lstat(filepath.Join(dst, "f")); !os.IsNotExist(err) {
		t.Errorf("the existing tree changed: %v", err)
	}
}

// TestParentInheritance: a setgid bit or a default ACL on the directory the
// tree is built in does not leak into the tree.
func TestParentInheritance(t *testing.T) {
	requireRoot(t)
	parent := t.TempDir()
	if err := os.Chown(parent, 0, 4321); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(parent, 0o2755|os.ModeSetgid); err != nil {
		t.Fatal(err)
	}
	// u::rwx g::--- o::---: without the fix, new entries lose group and
	// other permissions and the umask no longer applies.
	acl := []byte{2, 0, 0, 0}
	for _, tag := range []uint16{0x01, 0x04, 0x20} {
		perm := uint16(0)
		if tag == 0x01 {
			perm = 7
		}
		acl = append(acl, byte(tag), byte(tag>>8), byte(perm), 0, 0xff, 0xff, 0xff, 0xff)
	}
	if err := syscall.Setxattr(parent, "system.posix_acl_default", acl, 0); err != nil {
		t.Skipf("no default ACLs here: %v", err)
	}
	dst := filepath.Join(parent, "meta")
	err := Build(t.Context(), dst, []Entry{
		{Path: "f", Mode: modeReg | 0o644},
		{Path: "d", Mode: modeDir | 0o755},
		{Path: "d/g", Mode: modeReg | 0o755, Size: 3, Redirect: "/" + RedirectRoot + "/k/1"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for p, mode := range map[string]uint32{".": modeDir | 0o755, "f": modeReg | 0o644, "d": modeDir | 0o755, "d/g": modeReg | 0o755} {
		st := lstat(t, filepath.Join(dst, p))
		if st.Mode != mode || st.Gid != 0 {
			t.Errorf("%s: mode %#o gid %d, want %#o gid 0", p, st.Mode, st.Gid, mode)
		}
	}
}

// TestBuildCancelled: a cancelled build returns the context's error and
// leaves nothing.
func TestBuildCancelled(t *testing.T) {
	requireRoot(t)
	parent := t.TempDir()
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := Build(ctx, filepath.Join(parent, "meta"), synthetic(10, 100, false)); !errors.Is(err, context.Canceled) {
		t.Fatalf("Build: %v, want context.Canceled", err)
	}
	if left, _ := os.ReadDir(parent); len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}
}
