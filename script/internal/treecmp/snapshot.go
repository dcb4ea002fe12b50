package treecmp

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Info is what Snapshot records about one path.
type Info struct {
	// Mode is st_mode: the file type and the permission, setuid, setgid
	// and sticky bits.
	Mode uint32
	Uid  uint32
	Gid  uint32
	// Size is st_size.
	Size int64
	// SHA256 is the hex sha256 of a regular file's content, "" otherwise.
	SHA256 string
	// Target is a symlink's target, "" otherwise.
	Target string
	// Xattrs holds every extended attribute by name; nil if none.
	Xattrs map[string]string
	// Rdev is the device number of a char or block device, 0 otherwise.
	Rdev uint64
	// Mtime is the modification time, to the nanosecond, in UTC.
	Mtime time.Time
	// Dev and Ino identify the inode; Nlink is its link count.
	Dev, Ino, Nlink uint64
}

// Type returns the file type bits of Mode (unix.S_IFMT).
func (i Info) Type() uint32 { return i.Mode & unix.S_IFMT }

// Options adjust what Snapshot and Compare look at. The zero value looks at
// everything.
type Options struct {
	// Skip, if not nil, is called with every path below the root ("/a/b");
	// when it returns true the path, and everything under it, is left out.
	// The root ("/") itself is always recorded.
	Skip func(path string) bool
	// IgnoreXattr, if not nil, leaves out the extended attributes it
	// returns true for.
	IgnoreXattr func(name string) bool
}

// Snapshot records every path under root with the zero Options. See
// Options.Snapshot.
func Snapshot(ctx context.Context, root string) (map[string]Info, error) {
	return Options{}.Snapshot(ctx, root)
}

// Snapshot records every path under root (root itself included, as "/"),
// keyed by its path relative to root with a leading slash ("/a/b"). Names
// are kept as the bytes the filesystem returns. Symlinks are recorded, never
// followed; root itself may be a symlink to a directory.
func (o Options) Snapshot(ctx context.Context, root string) (map[string]Info, error) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open tree root %s: %w", root, err)
	}
	defer unix.Close(fd)
	w := &walker{ctx: ctx, opts: o, out: make(map[string]Info), buf: make([]byte, 1<<20)}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat tree root %s: %w", root, err)
	}
	info := infoFromStat(&st)
	if info.Xattrs, err = w.xattrs("/proc/self/fd/" + strconv.Itoa(fd)); err != nil {
		return nil, fmt.Errorf("tree root %s: %w", root, err)
	}
	w.out["/"] = info
	if err := w.walkDir(fd, ""); err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", root, err)
	}
	return w.out, nil
}

// walker holds the state of one Snapshot.
type walker struct {
	ctx  context.Context
	opts Options
	out  map[string]Info
	buf  []byte // for hashing and reading directories
}

func infoFromStat(st *unix.Stat_t) Info {
	info := Info{
		Mode:  st.Mode,
		Uid:   st.Uid,
		Gid:   st.Gid,
		Size:  st.Size,
		Mtime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec).UTC(),
		Dev:   st.Dev,
		Ino:   st.Ino,
		Nlink: st.Nlink,
	}
	if t := st.Mode & unix.S_IFMT; t == unix.S_IFCHR || t == unix.S_IFBLK {
		info.Rdev = st.Rdev
	}
	return info
}

// walkDir records the entries of the directory open as dirfd, whose path is
// dir ("" for the root), and recurses into subdirectories.
func (w *walker) walkDir(dirfd int, dir string) error {
	names, err := w.readNames(dirfd)
	if err != nil {
		return fmt.Errorf("read directory %q: %w", dir+"/", err)
	}
	for _, name := range names {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		p := dir + "/" + name
		if w.opts.Skip != nil && w.opts.Skip(p) {
			continue
		}
		if err := w.visit(dirfd, name, p); err != nil {
			return fmt.Errorf("%q: %w", p, err)
		}
	}
	return nil
}

// visit records the entry name of the directory dirfd, at path p.
func (w *walker) visit(dirfd int, name, p string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	info := infoFromStat(&st)
	var err error
	// The magic link names the directory, so the path stays short however
	// deep the tree is; the last component is not followed.
	if info.Xattrs, err = w.xattrs("/proc/self/fd/" + strconv.Itoa(dirfd) + "/" + name); err != nil {
		return err
	}
	switch info.Type() {
	case unix.S_IFREG:
		if info.SHA256, err = w.hash(dirfd, name); err != nil {
			return err
		}
	case unix.S_IFLNK:
		if info.Target, err = readlinkat(dirfd, name, st.Size); err != nil {
			return err
		}
	case unix.S_IFDIR:
		fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open directory: %w", err)
		}
		err = w.walkDir(fd, p)
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	w.out[p] = info
	return nil
}

// readNames returns the names in the directory dirfd, without "." and "..".
func (w *walker) readNames(dirfd int) ([]string, error) {
	var names []string
	for {
		n, err := unix.Getdents(dirfd, w.buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("getdents: %w", err)
		}
		if n <= 0 {
			return names, nil
		}
		_, _, names = unix.ParseDirent(w.buf[:n], -1, names)
	}
}

// hash returns the hex sha256 of the regular file name in dirfd.
func (w *walker) hash(dirfd int, name string) (string, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return "", fmt.Errorf("open: %w", err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	h := sha256.New()
	// Hide WriterTo so that the big buffer is used.
	if _, err := io.CopyBuffer(h, struct{ io.Reader }{f}, w.buf); err != nil {
		return "", fmt.Errorf("read: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func readlinkat(dirfd int, name string, size int64) (string, error) {
	buf := make([]byte, max(size+1, 256))
	for {
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", fmt.Errorf("readlink: %w", err)
		}
		if n < len(buf) {
			return string(buf[:n]), nil
		}
		buf = make([]byte, 2*len(buf))
	}
}

// xattrs returns the extended attributes of path (not following a final
// symlink), without those Options.IgnoreXattr drops. A filesystem without
// xattr support has none.
func (w *walker) xattrs(path string) (map[string]string, error) {
	names, err := retryERANGE(func(b []byte) (int, error) { return unix.Llistxattr(path, b) })
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listxattr: %w", err)
	}
	var out map[string]string
	for _, n := range bytes.Split(names, []byte{0}) {
		name := string(n)
		if name == "" || (w.opts.IgnoreXattr != nil && w.opts.IgnoreXattr(name)) {
			continue
		}
		v, err := retryERANGE(func(b []byte) (int, error) { return unix.Lgetxattr(path, name, b) })
		if errors.Is(err, unix.ENODATA) {
			continue // removed since listed
		}
		if err != nil {
			return nil, fmt.Errorf("getxattr %s: %w", name, err)
		}
		if out == nil {
			out = make(map[string]string)
		}
		out[name] = string(v)
	}
	return out, nil
}

// retryERANGE calls get with a nil buffer to learn the size, then with a
// buffer of that size, again if the value grew in between.
func retryERANGE(get func([]byte) (int, error)) ([]byte, error) {
	for range 10 {
		n, err := get(nil)
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, nil
		}
		b := make([]byte, n)
		n, err = get(b)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return b[:n], nil
	}
	return nil, unix.ERANGE
}
