package testimage

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// FromDir returns a layer holding the tree at root: every directory,
// regular file, symlink, hardlink, character and block device and FIFO,
// with its mode (setuid, setgid and sticky bits included), numeric owner,
// modification time to the nanosecond and extended attributes. Entries
// are listed in lexical path order, parents first. Files sharing an inode
// become one regular file and hardlinks to it. Regular files are read
// from the host when the layer is written (see HostFile), so the tree
// must not change until the image is pushed. Sockets are left out: tar
// cannot hold them; so are extended attributes with empty values, which
// PAX defines as unset.
func FromDir(root string, c Compression) (Layer, error) {
	return FromDirDiff("", root, c)
}

// FromDirDiff returns a layer recording what changed from the tree at
// lower to the tree at upper, as an image builder records a build step
// that turned lower into upper: every path of upper that is new or whose
// metadata differs, the directories above those, and a whiteout for every
// path of lower that upper lacks (one for a removed directory, none for
// what was below it), after the directories above it. Entries are as
// FromDir makes them; whiteouts come last. An empty lower gives FromDir's
// layer.
//
// Contents are not compared: like rsync's quick check, a path is taken as
// unchanged when its type, mode, owner, size, modification time, link
// target, device number and extended attributes are, which holds when
// upper began as a copy of lower that preserved modification times
// (cp -a). A new name for an inode that already had a name in lower
// becomes a copy of the file rather than a hardlink.
func FromDirDiff(lower, upper string, c Compression) (Layer, error) {
	d := differ{lower: lower, upper: upper, emitted: map[string]bool{}, inodes: map[inode]string{}}
	if err := filepath.WalkDir(upper, d.visitUpper); err != nil {
		return Layer{}, fmt.Errorf("walk %s: %w", upper, err)
	}
	if lower != "" {
		if err := filepath.WalkDir(lower, d.visitLower); err != nil {
			return Layer{}, fmt.Errorf("walk %s: %w", lower, err)
		}
	}
	return Layer{Entries: d.entries, Compression: c}, nil
}

// inode identifies a file on the host, to find hardlinks.
type inode struct{ dev, ino uint64 }

// differ collects the entries of FromDirDiff.
type differ struct {
	lower, upper string
	entries      []Entry
	emitted      map[string]bool  // relative paths already listed
	inodes       map[inode]string // first listed name of multi-link files
}

// hostNode is what FromDirDiff knows about one path.
type hostNode struct {
	st     unix.Stat_t
	link   string            // symlink target
	xattrs map[string]string // non-empty values only
}

func readNode(p string) (hostNode, error) {
	var n hostNode
	if err := unix.Lstat(p, &n.st); err != nil {
		return n, &fs.PathError{Op: "lstat", Path: p, Err: err}
	}
	if n.st.Mode&unix.S_IFMT == unix.S_IFLNK {
		t, err := os.Readlink(p)
		if err != nil {
			return n, err
		}
		n.link = t
	}
	x, err := readXattrs(p)
	if err != nil {
		return n, err
	}
	n.xattrs = x
	return n, nil
}

// readXattrs returns the extended attributes of p itself (not of a
// symlink's target) that have a value.
func readXattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if errors.Is(err, unix.ENOTSUP) || size == 0 {
		return nil, nil
	}
	if err != nil {
		return nil, &fs.PathError{Op: "llistxattr", Path: p, Err: err}
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, &fs.PathError{Op: "llistxattr", Path: p, Err: err}
	}
	var out map[string]string
	for name := range strings.SplitSeq(string(buf[:size]), "\x00") {
		if name == "" {
			continue
		}
		vsize, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			return nil, &fs.PathError{Op: "lgetxattr " + name, Path: p, Err: err}
		}
		if vsize == 0 {
			continue
		}
		val := make([]byte, vsize)
		vsize, err = unix.Lgetxattr(p, name, val)
		if err != nil {
			return nil, &fs.PathError{Op: "lgetxattr " + name, Path: p, Err: err}
		}
		if out == nil {
			out = map[string]string{}
		}
		out[name] = string(val[:vsize])
	}
	return out, nil
}

// sameNode reports whether a and b look like the same unchanged file.
func sameNode(a, b hostNode) bool {
	if a.st.Mode != b.st.Mode || a.st.Uid != b.st.Uid || a.st.Gid != b.st.Gid ||
		a.st.Mtim != b.st.Mtim || a.link != b.link || a.st.Rdev != b.st.Rdev {
		return false
	}
	if a.st.Mode&unix.S_IFMT == unix.S_IFREG && a.st.Size != b.st.Size {
		return false
	}
	if len(a.xattrs) != len(b.xattrs) {
		return false
	}
	for k, v := range a.xattrs {
		if bv, ok := b.xattrs[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

func (d *differ) visitUpper(p string, _ fs.DirEntry, err error) error {
	if err != nil {
		return err
	}
	rel, err := filepath.Rel(d.upper, p)
	if err != nil || rel == "." {
		return err
	}
	rel = filepath.ToSlash(rel)
	n, err := readNode(p)
	if err != nil {
		return err
	}
	if d.lower != "" {
		ln, err := readNode(filepath.Join(d.lower, rel))
		if err == nil && sameNode(n, ln) {
			return nil
		}
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if err := d.emitParents(rel); err != nil {
		return err
	}
	return d.emit(rel, p, n)
}

// emitParents lists the directories above rel that are not listed yet,
// with upper's metadata, so every entry's parent precedes it.
func (d *differ) emitParents(rel string) error {
	dir := path.Dir(rel)
	if dir == "." || d.emitted[dir] {
		return nil
	}
	if err := d.emitParents(dir); err != nil {
		return err
	}
	p := filepath.Join(d.upper, dir)
	n, err := readNode(p)
	if err != nil {
		return err
	}
	return d.emit(dir, p, n)
}

// emit lists the host path p, found at rel in the tree, as an entry.
func (d *differ) emit(rel, p string, n hostNode) error {
	e := Entry{
		Name:    rel,
		Mode:    int64(n.st.Mode & 0o7777),
		Uid:     int(n.st.Uid),
		Gid:     int(n.st.Gid),
		ModTime: time.Unix(n.st.Mtim.Sec, n.st.Mtim.Nsec).UTC(),
		Xattrs:  n.xattrs,
	}
	switch n.st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		e.Type, e.Name = TypeDir, rel+"/"
	case unix.S_IFREG:
		e.Type, e.Body = TypeReg, HostFile(p)
		if n.st.Nlink > 1 {
			key := inode{dev: n.st.Dev, ino: n.st.Ino}
			if first, ok := d.inodes[key]; ok {
				e.Type, e.Body, e.Linkname = TypeHardlink, nil, first
			} else {
				d.inodes[key] = rel
			}
		}
	case unix.S_IFLNK:
		e.Type, e.Linkname = TypeSymlink, n.link
	case unix.S_IFCHR, unix.S_IFBLK:
		e.Type = TypeChar
		if n.st.Mode&unix.S_IFMT == unix.S_IFBLK {
			e.Type = TypeBlock
		}
		e.Devmajor, e.Devminor = int64(unix.Major(n.st.Rdev)), int64(unix.Minor(n.st.Rdev))
	case unix.S_IFIFO:
		e.Type = TypeFIFO
	default: // a socket
		return nil
	}
	d.entries = append(d.entries, e)
	d.emitted[rel] = true
	return nil
}

// visitLower adds a whiteout for each path of lower that upper lacks.
func (d *differ) visitLower(p string, de fs.DirEntry, err error) error {
	if err != nil {
		return err
	}
	rel, err := filepath.Rel(d.lower, p)
	if err != nil || rel == "." {
		return err
	}
	rel = filepath.ToSlash(rel)
	var st unix.Stat_t
	err = unix.Lstat(filepath.Join(d.upper, rel), &st)
	switch {
	case errors.Is(err, unix.ENOENT):
		// The parents go first, with their metadata: an extractor would
		// otherwise make them up, and the upper layer's directory is
		// what overlayfs shows.
		if err := d.emitParents(rel); err != nil {
			return err
		}
		d.entries = append(d.entries, Whiteout(rel))
	case err != nil:
		return &fs.PathError{Op: "lstat", Path: filepath.Join(d.upper, rel), Err: err}
	case st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return nil // look inside
	}
	if de.IsDir() {
		return filepath.SkipDir // removed or replaced as a whole
	}
	return nil
}
