package meta

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// Build writes the metadata tree of one layer, described by entries, at
// dir, which must not exist. The tree is written in a new directory beside
// dir and renamed into place, so dir either does not exist or holds the
// whole tree; on error nothing is left.
//
// Entries may come in any order. Build refuses the whole layer when an
// entry's path is not clean, is absolute, leaves the root, contains NUL,
// has a parent that is not a directory entry (such as a symlink), or is
// the reserved top-level RedirectRoot; when two entries have the same path
// or two inodes the same redirect; or when an entry is malformed.
//
// Build needs CAP_SYS_ADMIN (trusted.* xattrs), CAP_MKNOD (devices and
// whiteouts) and CAP_CHOWN, and a file system with trusted xattrs.
func Build(ctx context.Context, dir string, entries []Entry) error {
	return build(ctx, dir, entries, min(runtime.GOMAXPROCS(0), 8))
}

// build is Build with workers directories filled at once.
func build(ctx context.Context, dir string, entries []Entry, workers int) error {
	t, err := plan(entries)
	if err != nil {
		return fmt.Errorf("metadata tree %s: %w", dir, err)
	}
	dir = filepath.Clean(dir)
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "."+filepath.Base(dir)+".tmp-")
	if err != nil {
		return fmt.Errorf("metadata tree %s: %w", dir, err)
	}
	if err := prepareRoot(tmp); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("metadata tree %s: %w", dir, err)
	}
	if err := t.write(ctx, tmp, workers); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("metadata tree %s: %w", dir, err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, dir, unix.RENAME_NOREPLACE); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("metadata tree %s: rename into place: %w", dir, err)
	}
	return nil
}

// prepareRoot makes sure nothing created under root inherits anything from
// root's parent: a setgid bit (the group of new files) or a default ACL
// (which replaces the umask), so that each entry is created as asked.
func prepareRoot(root string) error {
	if err := os.Chown(root, os.Geteuid(), os.Getegid()); err != nil {
		return err
	}
	if err := os.Chmod(root, 0o700); err != nil {
		return err
	}
	err := unix.Removexattr(root, "system.posix_acl_default")
	if err != nil && !errors.Is(err, unix.ENODATA) && !errors.Is(err, unix.ENOTSUP) {
		return fmt.Errorf("remove inherited default ACL: %w", err)
	}
	return nil
}

// write creates the tree under root, an empty directory. Creating a name
// changes its directory's mtime, so a directory gets its own attributes
// once all its names exist: at the end of filling it, or, when it holds
// hard links, after they are made.
func (t *tree) write(ctx context.Context, root string, workers int) error {
	rootFD, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(rootFD)
	w := &writer{t: t, root: rootFD, workers: workers, umask: umask(), linked: map[int32]bool{}}
	w.owned = os.Geteuid() == 0 && os.Getegid() == 0
	for _, i := range t.links {
		w.linked[t.nodes[i].parent] = true
	}
	if err := w.eachDir(ctx, w.fill); err != nil {
		return err
	}
	for _, i := range t.links {
		if err := w.link(i); err != nil {
			return err
		}
	}
	for d := range w.linked {
		if err := w.finishDir(d); err != nil {
			return err
		}
	}
	return nil
}

type writer struct {
	t       *tree
	root    int            // the tree's root directory
	workers int            // how many directories are filled at once
	umask   uint32         // the process's umask, or 0o777 when unknown
	linked  map[int32]bool // directories that hold hard links
	owned   bool           // new entries belong to 0:0, the usual owner
	// All fields are read-only once write starts filling directories.
}

// umask returns the process's file mode creation mask without changing it
// (umask(2) can only set it, for every thread at once).
func umask() uint32 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0o777
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Umask:"); ok {
			if m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32); err == nil {
				return uint32(m)
			}
		}
	}
	return 0o777
}

// chown reports whether e, just created, needs a chown.
func (w *writer) chown(e *Entry) bool {
	return !w.owned || e.UID != 0 || e.GID != 0
}

// createMode returns the mode to create an entry with, and whether it
// needs a chmod after: the umask applies at creation, and a chown drops
// setuid and setgid.
func (w *writer) createMode(e *Entry) (uint32, bool) {
	perm := e.Mode & 0o7777
	if perm&0o7000 == 0 && perm&w.umask == 0 {
		return perm, false
	}
	return perm & 0o700, true
}

// eachDir calls fn for every directory, parents before children, several at
// a time: a directory's children are created only once it exists.
func (w *writer) eachDir(ctx context.Context, fn func(dir int32) error) error {
	for l := 1; l < len(w.t.levels); l++ {
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(w.workers)
		for _, d := range w.t.dirs[w.t.levels[l-1]:w.t.levels[l]] {
			g.Go(func() error {
				if err := gctx.Err(); err != nil {
					return err
				}
				return fn(d)
			})
		}
		if err := g.Wait(); err != nil {
			return err
		}
	}
	return nil
}

// openDir opens directory node d of the tree being written, refusing to
// resolve any symlink on the way.
func (w *writer) openDir(d int32) (int, error) {
	p := w.t.nodes[d].e.Path
	if d == 0 {
		p = "."
	}
	fd, err := unix.Openat2(w.root, p, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
	})
	if err != nil {
		return -1, fmt.Errorf("open %q: %w", p, err)
	}
	return fd, nil
}

// fill creates the children of directory d, but not hard links, and then
// sets d's own attributes unless hard links are still to come.
func (w *writer) fill(d int32) error {
	dfd, err := w.openDir(d)
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	for _, k := range w.t.nodes[d].kids {
		n := &w.t.nodes[k]
		if n.target >= 0 {
			continue
		}
		if err := w.create(dfd, n); err != nil {
			return fmt.Errorf("create %q: %w", n.e.Path, err)
		}
	}
	if w.linked[d] {
		return nil
	}
	_, chmod := w.createMode(w.t.nodes[d].e)
	if err := w.setAttrs(dfd, w.t.nodes[d].e, chmod || d == 0); err != nil {
		return fmt.Errorf("directory %q: %w", w.t.nodes[d].e.Path, err)
	}
	return nil
}

// create makes the non-link node n in the directory dfd, with its
// attributes unless it is a directory.
func (w *writer) create(dfd int, n *node) error {
	e := n.e
	mode, chmod := w.createMode(e)
	switch e.Mode & syscall.S_IFMT {
	case syscall.S_IFDIR:
		return unix.Mkdirat(dfd, n.name, mode)
	case syscall.S_IFREG:
		return w.createFile(dfd, n, mode, chmod)
	case syscall.S_IFLNK:
		if err := unix.Symlinkat(e.Linkname, dfd, n.name); err != nil {
			return err
		}
		chmod = false
	default: // devices, fifos, whiteouts
		if err := unix.Mknodat(dfd, n.name, e.Mode&syscall.S_IFMT|mode, int(e.Rdev)); err != nil {
			return err
		}
	}
	if w.chown(e) {
		if err := unix.Fchownat(dfd, n.name, int(e.UID), int(e.GID), unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
	}
	if len(e.Xattrs) > 0 {
		// No fd can be opened on a symlink, device or fifo to set xattrs
		// on; reach it through the directory's fd instead.
		p := "/proc/self/fd/" + strconv.Itoa(dfd) + "/" + n.name
		err := setXattrs(e, func(name string, value []byte) error {
			return unix.Lsetxattr(p, name, value, 0)
		})
		if err != nil {
			return err
		}
	}
	if chmod {
		if err := unix.Fchmodat(dfd, n.name, e.Mode&0o7777, 0); err != nil {
			return err
		}
	}
	return unix.UtimesNanoAt(dfd, n.name, times(e), unix.AT_SYMLINK_NOFOLLOW)
}

// createFile makes a regular file: an empty one as it is, a non-empty one
// as an overlay metacopy file of its size with its redirect.
func (w *writer) createFile(dfd int, n *node, mode uint32, chmod bool) (err error) {
	e := n.e
	fd, err := unix.Openat(dfd, n.name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := unix.Close(fd); err == nil {
			err = cerr
		}
	}()
	if e.Size > 0 {
		if err := unix.Ftruncate(fd, e.Size); err != nil {
			return err
		}
	}
	return w.setAttrs(fd, e, chmod)
}

// setAttrs sets the attributes of a regular file or directory open as fd,
// in the order containerd's applier uses: owner, xattrs, mode (unless chmod
// is false: it was created with its mode), times. A chown drops setuid bits
// and security.capability, so it comes first.
func (w *writer) setAttrs(fd int, e *Entry, chmod bool) error {
	if w.chown(e) {
		if err := unix.Fchown(fd, int(e.UID), int(e.GID)); err != nil {
			return err
		}
	}
	set := func(name string, value []byte) error { return unix.Fsetxattr(fd, name, value, 0) }
	if e.Mode&syscall.S_IFMT == syscall.S_IFREG && e.Size > 0 {
		if err := set(xattrMetacopy, nil); err != nil {
			return fmt.Errorf("set %s: %w", xattrMetacopy, err)
		}
		if err := set(xattrRedirect, []byte(e.Redirect)); err != nil {
			return fmt.Errorf("set %s: %w", xattrRedirect, err)
		}
	}
	if e.Opaque {
		if err := set(xattrOpaque, []byte("y")); err != nil {
			return fmt.Errorf("set %s: %w", xattrOpaque, err)
		}
	}
	if err := setXattrs(e, set); err != nil {
		return err
	}
	if chmod {
		if err := unix.Fchmod(fd, e.Mode&0o7777); err != nil {
			return err
		}
	}
	return futimens(fd, times(e))
}

// setXattrs sets the image xattrs of e that the tree keeps.
func setXattrs(e *Entry, set func(string, []byte) error) error {
	for name, value := range e.Xattrs {
		if !keepXattr(name) {
			continue
		}
		err := set(name, value)
		switch {
		case err == nil:
		case errors.Is(err, unix.ENOTSUP):
			// containerd skips what the file system does not support.
		case errors.Is(err, unix.EPERM) && len(name) > 5 && name[:5] == "user." &&
			e.Mode&syscall.S_IFMT != syscall.S_IFREG && e.Mode&syscall.S_IFMT != syscall.S_IFDIR:
			// user.* exists only on regular files and directories.
		default:
			return fmt.Errorf("set xattr %q: %w", name, err)
		}
	}
	return nil
}

// link makes hard-link node i another name of its target.
func (w *writer) link(i int32) error {
	n := &w.t.nodes[i]
	target := &w.t.nodes[n.target]
	tdir, err := w.openDir(w.parent(n.target))
	if err != nil {
		return err
	}
	defer unix.Close(tdir)
	ldir, err := w.openDir(w.parent(i))
	if err != nil {
		return err
	}
	defer unix.Close(ldir)
	if err := unix.Linkat(tdir, target.name, ldir, n.name, 0); err != nil {
		return fmt.Errorf("hard link %q to %q: %w", n.e.Path, target.e.Path, err)
	}
	return nil
}

// parent returns the directory node that holds node i.
func (w *writer) parent(i int32) int32 {
	return w.t.nodes[i].parent
}

// finishDir sets directory d's own attributes.
func (w *writer) finishDir(d int32) error {
	fd, err := w.openDir(d)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := w.setAttrs(fd, w.t.nodes[d].e, true); err != nil {
		return fmt.Errorf("directory %q: %w", w.t.nodes[d].e.Path, err)
	}
	return nil
}

// times returns the access and modification times of e.
func times(e *Entry) []unix.Timespec {
	var ts unix.Timespec // the epoch, for the zero Time
	if !e.ModTime.IsZero() {
		ts.Sec, ts.Nsec = e.ModTime.Unix(), int64(e.ModTime.Nanosecond())
	}
	return []unix.Timespec{ts, ts}
}

// futimens sets the times of the file open as fd.
func futimens(fd int, ts []unix.Timespec) error {
	_, _, errno := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(&ts[0])), 0, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}
