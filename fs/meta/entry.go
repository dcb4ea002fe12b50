package meta

import (
	"fmt"
	"path"
	"strings"
	"syscall"
	"time"
)

// RedirectRoot is the top-level name every redirect starts with
// ("/" + RedirectRoot + "/..."). No lower layer of a mount that uses
// metadata trees may hold it: overlay looks a redirect up in the lower
// layers below the metacopy file before the data-only layers, so a file
// there would be served as another layer's data.
const RedirectRoot = ".lazylayer"

// MetacopyOption is the overlay mount option a mount needs when a lower
// layer follows a metadata tree (see the package documentation).
const MetacopyOption = "metacopy=on"

const (
	xattrMetacopy = "trusted.overlay.metacopy"
	xattrRedirect = "trusted.overlay.redirect"
	xattrOpaque   = "trusted.overlay.opaque"

	// maxRedirect is overlay's redirect_max module parameter default.
	maxRedirect = 256
	maxName     = 255
)

// An Entry is one name in a layer. Everything in it is image content,
// untrusted, except Redirect, which lazylayer generates.
type Entry struct {
	// Path is the entry's name, slash-separated and relative to the layer
	// root, in clean form ("usr/bin/python3"); "." (or "") is the root
	// directory, which is 0755 root:root at the epoch when no entry
	// describes it. Every other parent directory must be an entry too.
	Path string

	// Mode is st_mode: one type (syscall.S_IFREG, S_IFDIR, S_IFLNK,
	// S_IFCHR, S_IFBLK or S_IFIFO) and the permission bits, setuid, setgid
	// and sticky included. A character device with Rdev 0 is an overlay
	// whiteout, which hides the name in lower layers.
	Mode uint32

	UID, GID uint32

	// Size is a regular file's size in bytes.
	Size int64

	// ModTime is the modification time, kept to the nanosecond; the access
	// time is set to it too. The zero Time is the epoch.
	ModTime time.Time

	// Linkname is a symbolic link's target, stored as given and never
	// followed.
	Linkname string

	// Rdev is a character or block device's number (unix.Mkdev).
	Rdev uint64

	// Xattrs are the image's extended attributes. As containerd's applier
	// does, the tree gets all of them but trusted.* (overlay reads its own
	// attributes, trusted.overlay.*, from lower layers) and, beyond
	// containerd, user.overlay.* (overlay's attributes under userxattr).
	// Names the file system does not support, and user.* on entries other
	// than regular files and directories, are skipped as containerd skips
	// them.
	Xattrs map[string][]byte

	// Opaque marks a directory that hides the contents of the same
	// directory in lower layers (a ".wh..wh..opq" entry in the tar).
	Opaque bool

	// Redirect is where a non-empty regular file's data lives in the
	// data-only layers: an absolute, clean path under RedirectRoot, at most
	// 256 bytes, unique in the layer, e.g. "/.lazylayer/<layer key>/<inode>".
	// lazylayer generates it; it is never taken from image content. It is
	// required for non-empty regular files and must be empty otherwise.
	// On ext4 with 256-byte inodes a redirect of up to 24 bytes keeps the
	// file's attributes inside its inode; a longer one costs a 4 KiB block.
	Redirect string

	// Link makes the entry another name (a hard link) of the entry at path
	// Link, which must not be a directory. The other fields are ignored:
	// the inode is the target's. A regular file's names share one metacopy
	// inode, so st_nlink and st_ino match the image.
	Link string
}

// node is one name in a planned tree.
type node struct {
	e      *Entry
	name   string  // last path component; "." for the root
	parent int32   // the directory node that holds it
	kids   []int32 // directories: child nodes
	target int32   // hard links: the node that holds the inode; -1 otherwise
}

// tree is a validated layer: every path is beneath the root, every parent
// is a directory the tree creates itself, so building it never follows a
// link the image made.
type tree struct {
	nodes  []node  // nodes[0] is the root
	dirs   []int32 // directory nodes, breadth first
	levels []int   // where each depth starts in dirs, and len(dirs)
	links  []int32 // hard-link nodes
}

// plan validates entries and arranges them as a tree.
func plan(entries []Entry) (*tree, error) {
	t := &tree{nodes: make([]node, 1, len(entries)+1)}
	t.nodes[0] = node{e: &Entry{Path: ".", Mode: syscall.S_IFDIR | 0o755}, name: ".", target: -1}
	byPath := make(map[string]int32, len(entries))
	byPath["."] = 0
	rootSeen := false
	for i := range entries {
		e := &entries[i]
		if e.Path == "." || e.Path == "" {
			if rootSeen {
				return nil, fmt.Errorf("entry %q: the root appears twice", e.Path)
			}
			if e.Link != "" || e.Mode&syscall.S_IFMT != syscall.S_IFDIR {
				return nil, fmt.Errorf("entry %q: the root must be a directory", e.Path)
			}
			if err := checkEntry(e); err != nil {
				return nil, fmt.Errorf("entry %q: %w", e.Path, err)
			}
			rootSeen = true
			t.nodes[0].e = e
			continue
		}
		if err := checkPath(e.Path); err != nil {
			return nil, fmt.Errorf("entry %q: %w", e.Path, err)
		}
		if _, dup := byPath[e.Path]; dup {
			return nil, fmt.Errorf("entry %q appears twice", e.Path)
		}
		if e.Link == "" {
			if err := checkEntry(e); err != nil {
				return nil, fmt.Errorf("entry %q: %w", e.Path, err)
			}
		}
		byPath[e.Path] = int32(len(t.nodes))
		t.nodes = append(t.nodes, node{e: e, name: path.Base(e.Path), target: -1})
	}
	if err := t.connect(byPath); err != nil {
		return nil, err
	}
	if err := t.resolveLinks(byPath); err != nil {
		return nil, err
	}
	return t, t.checkRedirects()
}

// connect gives each node its parent and lists the directories top down.
func (t *tree) connect(byPath map[string]int32) error {
	for i := 1; i < len(t.nodes); i++ {
		p := t.nodes[i].e.Path
		dir := path.Dir(p)
		if dir == "." && p == RedirectRoot {
			return fmt.Errorf("entry %q: the name is reserved for lazylayer's redirects", p)
		}
		pi, ok := byPath[dir]
		if !ok {
			return fmt.Errorf("entry %q: parent %q is not in the layer", p, dir)
		}
		if !t.isDir(pi) {
			return fmt.Errorf("entry %q: parent %q is not a directory", p, dir)
		}
		t.nodes[pi].kids = append(t.nodes[pi].kids, int32(i))
		t.nodes[i].parent = pi
	}
	t.dirs = append(t.dirs, 0)
	t.levels = append(t.levels, 0)
	for start := 0; start < len(t.dirs); {
		end := len(t.dirs)
		for _, d := range t.dirs[start:end] {
			for _, c := range t.nodes[d].kids {
				if t.isDir(c) {
					t.dirs = append(t.dirs, c)
				}
			}
		}
		t.levels = append(t.levels, end)
		start = end
	}
	return nil
}

func (t *tree) isDir(i int32) bool {
	e := t.nodes[i].e
	return e.Link == "" && e.Mode&syscall.S_IFMT == syscall.S_IFDIR
}

// resolveLinks points every hard link at the node holding its inode.
func (t *tree) resolveLinks(byPath map[string]int32) error {
	for i := 1; i < len(t.nodes); i++ {
		n := &t.nodes[i]
		if n.e.Link == "" {
			continue
		}
		target := n.e.Link
		for hops := 0; ; hops++ {
			ti, ok := byPath[target]
			if !ok || hops > len(t.nodes) {
				return fmt.Errorf("entry %q: hard link target %q is not in the layer", n.e.Path, n.e.Link)
			}
			te := t.nodes[ti].e
			if te.Link != "" {
				target = te.Link
				continue
			}
			if ti == 0 || t.isDir(ti) {
				return fmt.Errorf("entry %q: hard link to directory %q", n.e.Path, n.e.Link)
			}
			n.target = ti
			break
		}
		t.links = append(t.links, int32(i))
	}
	return nil
}

// checkRedirects makes sure no two inodes share a redirect.
func (t *tree) checkRedirects() error {
	seen := map[string]string{}
	for i := range t.nodes {
		e := t.nodes[i].e
		if e.Link != "" || e.Redirect == "" {
			continue
		}
		if other, dup := seen[e.Redirect]; dup {
			return fmt.Errorf("entries %q and %q: same redirect %q", other, e.Path, e.Redirect)
		}
		seen[e.Redirect] = e.Path
	}
	return nil
}

// checkPath accepts a clean relative path that stays beneath the root.
func checkPath(p string) error {
	switch {
	case strings.IndexByte(p, 0) >= 0:
		return fmt.Errorf("path contains NUL")
	case strings.HasPrefix(p, "/"):
		return fmt.Errorf("absolute path")
	case p == ".." || strings.HasPrefix(p, "../"):
		return fmt.Errorf("path leaves the layer")
	case path.Clean(p) != p:
		return fmt.Errorf("path is not clean")
	}
	for _, c := range strings.Split(p, "/") {
		if len(c) > maxName {
			return fmt.Errorf("name of %d bytes", len(c))
		}
	}
	return nil
}

// checkEntry validates the inode fields of an entry that is not a link.
func checkEntry(e *Entry) error {
	typ := e.Mode & syscall.S_IFMT
	switch typ {
	case syscall.S_IFREG, syscall.S_IFDIR, syscall.S_IFLNK, syscall.S_IFCHR, syscall.S_IFBLK, syscall.S_IFIFO:
	default:
		return fmt.Errorf("unsupported file type %#o", typ)
	}
	if e.Mode&^(syscall.S_IFMT|0o7777) != 0 {
		return fmt.Errorf("mode %#o has unknown bits", e.Mode)
	}
	if typ == syscall.S_IFREG && e.Size < 0 || typ != syscall.S_IFREG && e.Size != 0 {
		return fmt.Errorf("size %d for file type %#o", e.Size, typ)
	}
	if typ == syscall.S_IFLNK && (e.Linkname == "" || strings.IndexByte(e.Linkname, 0) >= 0) {
		return fmt.Errorf("symlink target %q", e.Linkname)
	}
	if e.Opaque && typ != syscall.S_IFDIR {
		return fmt.Errorf("opaque entry that is not a directory")
	}
	for name := range e.Xattrs {
		if name == "" || strings.IndexByte(name, 0) >= 0 {
			return fmt.Errorf("xattr name %q", name)
		}
	}
	if typ == syscall.S_IFREG && e.Size > 0 {
		return checkRedirect(e.Redirect)
	}
	if e.Redirect != "" {
		return fmt.Errorf("redirect %q on an entry that is not a non-empty regular file", e.Redirect)
	}
	return nil
}

// checkRedirect accepts an absolute clean path under RedirectRoot.
func checkRedirect(r string) error {
	prefix := "/" + RedirectRoot + "/"
	switch {
	case r == "":
		return fmt.Errorf("non-empty regular file without a redirect")
	case len(r) > maxRedirect:
		return fmt.Errorf("redirect of %d bytes, more than overlay's %d", len(r), maxRedirect)
	case !strings.HasPrefix(r, prefix) || len(r) == len(prefix):
		return fmt.Errorf("redirect %q is not under %s", r, prefix)
	case path.Clean(r) != r || strings.IndexByte(r, 0) >= 0:
		return fmt.Errorf("redirect %q is not a clean path", r)
	}
	return nil
}

// keepXattr reports whether an image xattr goes into the tree.
// KeepXattr reports whether an image's extended attribute name may be
// set on a layer's files: overlay's own attributes (trusted.overlay.*, and
// user.overlay.* under userxattr) would steer overlay (redirects,
// metacopy, opaque directories), so no trusted.* or user.overlay.* name
// from an image is kept.
func KeepXattr(name string) bool { return keepXattr(name) }

func keepXattr(name string) bool {
	return !strings.HasPrefix(name, "trusted.") && !strings.HasPrefix(name, "user.overlay.")
}
