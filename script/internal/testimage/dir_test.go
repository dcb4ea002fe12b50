package testimage

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/script/internal/treecmp"
)

// makeHostTree builds a tree with every kind of entry FromDir handles, and
// a socket it must leave out, and returns the socket's path.
func makeHostTree(t *testing.T, root string) string {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	write := func(p string, mode os.FileMode, content string) {
		t.Helper()
		must(os.WriteFile(filepath.Join(root, p), []byte(content), mode))
		must(os.Chmod(filepath.Join(root, p), mode)) // past the umask
	}
	must(os.MkdirAll(filepath.Join(root, "a/deep/er"), 0o755))
	must(os.Mkdir(filepath.Join(root, "b"), 0o755))
	must(os.Mkdir(filepath.Join(root, "sticky"), 0o755))
	must(os.Chmod(filepath.Join(root, "sticky"), os.ModeSticky|0o777))
	must(os.Chown(filepath.Join(root, "a"), 1000, 1001))
	must(os.Chmod(filepath.Join(root, "a"), 0o750))
	write("a/f", 0o644, "shared inode\n")
	write("a/unchanged", 0o600, "left alone\n")
	write("a/deep/er/leaf", 0o644, "leaf\n")
	write("a/suid", 0o755, "#!/bin/sh\n")
	must(os.Chmod(filepath.Join(root, "a/suid"), os.ModeSetuid|os.ModeSetgid|0o755))
	must(os.Link(filepath.Join(root, "a/f"), filepath.Join(root, "a/f2")))
	must(os.Link(filepath.Join(root, "a/f"), filepath.Join(root, "b/f3")))
	must(os.Symlink("a/f", filepath.Join(root, "l")))
	must(os.Lchown(filepath.Join(root, "l"), 1000, 1000))
	must(unix.Mkfifo(filepath.Join(root, "fifo"), 0o640))
	must(unix.Mknod(filepath.Join(root, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Mknod(filepath.Join(root, "loop"), unix.S_IFBLK|0o660, int(unix.Mkdev(7, 0))))
	must(unix.Setxattr(filepath.Join(root, "a"), "user.dir", []byte("on a dir"), 0))
	must(unix.Setxattr(filepath.Join(root, "a/f"), "user.bin", []byte("\x00\x01\xff"), 0))
	sock := filepath.Join(root, "sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	must(err)
	defer unix.Close(fd)
	must(unix.Bind(fd, &unix.SockaddrUnix{Name: sock}))
	setTimes(t, root)
	return sock
}

// setTimes gives every path below root a distinct nanosecond mtime,
// children before their directories.
func setTimes(t *testing.T, root string) {
	t.Helper()
	var paths []string
	filepath.WalkDir(root, func(p string, _ os.DirEntry, err error) error {
		if err == nil && p != root {
			paths = append(paths, p)
		}
		return err
	})
	slices.Reverse(paths)
	base := time.Date(2022, 3, 4, 5, 6, 7, 0, time.UTC)
	for i, p := range paths {
		ts := unix.NsecToTimespec(base.Add(time.Duration(i)*time.Hour + time.Duration(i+1)).UnixNano())
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			t.Fatal(err)
		}
	}
}

// compareTrees fails the test if the trees differ anywhere below the root
// (whose own metadata a layer does not carry).
func compareTrees(t *testing.T, want, got string) {
	t.Helper()
	diffs, err := treecmp.Compare(t.Context(), want, got)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range diffs {
		if !strings.HasPrefix(d, `"/":`) {
			t.Errorf("applied tree differs: %s", d)
		}
	}
}

func entryNames(l Layer) []string {
	var names []string
	for _, e := range l.Entries {
		names = append(names, e.Name)
	}
	return names
}

func TestFromDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: chown, mknod")
	}
	src := t.TempDir()
	sock := makeHostTree(t, src)
	l, err := FromDir(src, Gzip)
	if err != nil {
		t.Fatal(err)
	}
	names := entryNames(l)
	if slices.Contains(names, "sock") {
		t.Error("FromDir listed a socket")
	}
	var links []Entry
	for _, e := range l.Entries {
		if e.Type == TypeHardlink {
			links = append(links, e)
		}
	}
	if len(links) != 2 || links[0].Linkname != "a/f" || links[1].Linkname != "a/f" {
		t.Errorf("hardlinks = %+v, want a/f2 and b/f3 to a/f", links)
	}
	dst := t.TempDir()
	applyImage(t.Context(), t, dst, Image{Layers: []Layer{l}})
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	compareTrees(t, src, dst)
}

func TestFromDirDiff(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: chown, mknod")
	}
	dir := t.TempDir()
	lower, upper := filepath.Join(dir, "lower"), filepath.Join(dir, "upper")
	if err := os.Mkdir(lower, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Remove(makeHostTree(t, lower))
	if out, err := exec.Command("cp", "-a", lower, upper).CombinedOutput(); err != nil {
		t.Fatalf("cp -a: %v: %s", err, out)
	}
	// A build step: rewrite a file in place (all three of its names
	// change), add files, remove a directory and a symlink, change a mode,
	// add an xattr alone, and replace a file by a directory.
	step := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	step(os.WriteFile(filepath.Join(upper, "a/f"), []byte("rewritten, longer\n"), 0o644))
	step(os.MkdirAll(filepath.Join(upper, "c/new"), 0o755))
	step(os.WriteFile(filepath.Join(upper, "c/new/file"), []byte("new\n"), 0o644))
	step(os.RemoveAll(filepath.Join(upper, "b")))
	step(os.Remove(filepath.Join(upper, "l")))
	step(os.Chmod(filepath.Join(upper, "a/suid"), 0o700))
	step(unix.Lsetxattr(filepath.Join(upper, "a/deep/er/leaf"), "user.added", []byte("x"), 0))
	step(os.Remove(filepath.Join(upper, "fifo")))
	step(os.Mkdir(filepath.Join(upper, "fifo"), 0o700))

	base, err := FromDir(lower, Gzip)
	if err != nil {
		t.Fatal(err)
	}
	diff, err := FromDirDiff(lower, upper, Zstd)
	if err != nil {
		t.Fatal(err)
	}
	names := entryNames(diff)
	for _, n := range []string{"a/unchanged", "null", "loop", "sticky/"} {
		if slices.Contains(names, n) {
			t.Errorf("unchanged %q is in the diff: %q", n, names)
		}
	}
	for _, n := range []string{"a/f", "a/f2", "c/", "c/new/file", ".wh.b", ".wh.l", "a/suid", "a/deep/er/leaf", "fifo/"} {
		if !slices.Contains(names, n) {
			t.Errorf("%q is missing from the diff: %q", n, names)
		}
	}
	if slices.Contains(names, "b/.wh.f3") {
		t.Error("whiteout below a removed directory")
	}
	got := filepath.Join(dir, "applied")
	if err := os.Mkdir(got, 0o755); err != nil {
		t.Fatal(err)
	}
	applyImage(t.Context(), t, got, Image{Layers: []Layer{base, diff}})
	compareTrees(t, upper, got)
}
