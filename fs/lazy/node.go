package lazy

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// node is one inode of the lazy tree; it serves entry num of the layer's
// index.
//
// The kernel refuses to mix passthrough and page-cache opens of one inode
// (the second kind gets EIO), so a node counts its opens of each kind and
// opens a file with passthrough only while it has no page-cache opens.
type node struct {
	fs.Inode
	l     *Layer
	num   uint32
	bound bool   // counted in Layer.bound until OnForget
	path  string // relative to the layer root, as first looked up ("" for the root)

	mu          sync.Mutex
	cachedOpens int // open handles served through the page cache; guarded by mu
	passOpens   int // open handles with FUSE passthrough; guarded by mu
}

var (
	_ fs.NodeLookuper       = (*node)(nil)
	_ fs.NodeReaddirer      = (*node)(nil)
	_ fs.NodeGetattrer      = (*node)(nil)
	_ fs.NodeReadlinker     = (*node)(nil)
	_ fs.NodeGetxattrer     = (*node)(nil)
	_ fs.NodeListxattrer    = (*node)(nil)
	_ fs.NodeOpener         = (*node)(nil)
	_ fs.NodeOpendirHandler = (*node)(nil)
	_ fs.NodeStatfser       = (*node)(nil)
	_ fs.NodeFlusher        = (*node)(nil)
	_ fs.NodeOnForgetter    = (*node)(nil)
)

// Flush answers ENOSYS: the tree is read-only, and the kernel then stops
// sending a FLUSH round trip on every close.
func (n *node) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno {
	return syscall.ENOSYS
}

func (n *node) entry() *entry { return &n.l.ix.entries[n.num] }

// attr fills out with the attributes of entry num.
func (l *Layer) attr(num uint32, out *fuse.Attr) {
	e := &l.ix.entries[num]
	out.Ino = uint64(num) + 1
	out.Mode = e.mode
	out.Nlink = e.nlink
	out.Uid, out.Gid = e.uid, e.gid
	out.Size = uint64(e.size)
	out.Blocks = (out.Size + 511) / 512
	out.Blksize = 4096
	out.Rdev = l.ix.rdevs[num]
	sec, nsec := uint64(e.mtime/1e9), uint32(e.mtime%1e9)
	if e.mtime < 0 {
		sec, nsec = 0, 0
	}
	out.Mtime, out.Mtimensec = sec, nsec
	out.Atime, out.Atimensec = sec, nsec
	out.Ctime, out.Ctimensec = sec, nsec
}

func (n *node) Getattr(ctx context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.l.attr(n.num, &out.Attr)
	return 0
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	e := n.entry()
	if e.mode&syscall.S_IFMT != syscall.S_IFDIR {
		return nil, syscall.ENOTDIR
	}
	num, ok := n.l.ix.lookup(e, name)
	if !ok {
		return nil, syscall.ENOENT
	}
	n.l.attr(num, &out.Attr)
	child := &node{l: n.l, num: num, path: name}
	if n.path != "" {
		child.path = n.path + "/" + name
	}
	mode := n.l.ix.entries[num].mode & syscall.S_IFMT
	ch := n.NewInode(ctx, child, fs.StableAttr{Mode: mode, Ino: uint64(num) + 1})
	if n.l.top != nil && mode == syscall.S_IFREG && ch.Operations() == child {
		// A new inode: the kernel did not hold this file.
		child.bound = true
		n.l.bound.Add(1)
	}
	return ch, 0
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	e := n.entry()
	kids, names := n.l.ix.dirChildren(e), n.l.ix.dirNames(e)
	list := make([]fuse.DirEntry, 0, len(kids))
	for i, k := range kids {
		list = append(list, fuse.DirEntry{Name: names[i], Mode: n.l.ix.entries[k].mode, Ino: uint64(k) + 1})
	}
	return fs.NewListDirStream(list), 0
}

// OpendirHandle lets the kernel cache directory listings: layers never
// change.
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return &dirHandle{n: n}, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, 0
}

// dirHandle lists a directory; the offset after child i is i+1.
type dirHandle struct {
	n   *node
	pos uint64 // next child to return; a handle is used by one reader at a time
}

var (
	_ fs.FileReaddirenter = (*dirHandle)(nil)
	_ fs.FileSeekdirer    = (*dirHandle)(nil)
)

func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	ix := d.n.l.ix
	e := d.n.entry()
	if d.pos >= uint64(e.count) {
		return nil, 0
	}
	k := ix.dirChildren(e)[d.pos]
	name := ix.dirNames(e)[d.pos]
	d.pos++
	return &fuse.DirEntry{Name: name, Mode: ix.entries[k].mode, Ino: uint64(k) + 1, Off: d.pos}, 0
}

func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	d.pos = off
	return 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	target, ok := n.l.ix.links[n.num]
	if !ok {
		return nil, syscall.EINVAL
	}
	return []byte(target), 0
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	v, ok := n.l.ix.xattrs[n.num][attr]
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	var size int
	for k := range n.l.ix.xattrs[n.num] {
		size += len(k) + 1
	}
	if len(dest) < size {
		return uint32(size), syscall.ERANGE
	}
	i := 0
	for k := range n.l.ix.xattrs[n.num] {
		i += copy(dest[i:], k)
		dest[i] = 0
		i++
	}
	return uint32(size), 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize = 4096
	out.NameLen = 255
	out.Files = uint64(len(n.l.ix.entries))
	return 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC) != 0 {
		return nil, 0, syscall.EROFS
	}
	if n.entry().mode&syscall.S_IFMT != syscall.S_IFREG {
		return nil, 0, syscall.EINVAL
	}
	n.l.recordOpen(n.num, n.relPath())
	n.mu.Lock()
	defer n.mu.Unlock()
	if local := n.l.localDir(); local != "" && n.l.passthrough && n.cachedOpens == 0 {
		f, err := openBeneath(local, n.relPath())
		if err == nil {
			n.passOpens++
			return &passHandle{n: n, f: f}, 0, 0
		}
		if n.l.complete.Load() || !errors.Is(err, os.ErrNotExist) {
			log.G(ctx).WithError(err).WithField("layer", n.l.desc.Digest).Warn("cannot open local file for passthrough")
		}
	}
	if n.passOpens > 0 {
		// Page-cache opens cannot join passthrough ones.
		return nil, 0, syscall.EIO
	}
	n.cachedOpens++
	return &handle{n: n}, fuse.FOPEN_KEEP_CACHE, 0
}

// passHandle is a file opened with FUSE passthrough: the kernel reads the
// local file itself. Read is called only if the kernel declined
// passthrough for the mount.
type passHandle struct {
	n *node
	f *os.File
}

var (
	_ fs.FilePassthroughFder = (*passHandle)(nil)
	_ fs.FileReader          = (*passHandle)(nil)
	_ fs.FileReleaser        = (*passHandle)(nil)
)

func (h *passHandle) PassthroughFd() (int, bool) { return int(h.f.Fd()), true }

func (h *passHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h.n.l.reads.Add(1)
	n, err := h.f.ReadAt(dest, off)
	if err != nil && err != io.EOF {
		return nil, fs.ToErrno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (h *passHandle) Release(ctx context.Context) syscall.Errno {
	h.n.mu.Lock()
	h.n.passOpens--
	h.n.mu.Unlock()
	h.f.Close()
	return 0
}

// handle is a regular file opened through the page cache. Until the layer
// is local it reads chunks, fetching ahead on sequential reads; then it
// reads the local file.
type handle struct {
	n *node

	mu      sync.Mutex
	nextOff int64    // where a sequential read would continue; guarded by mu
	local   *os.File // the local file, once the layer is local; guarded by mu
}

var (
	_ fs.FileReader   = (*handle)(nil)
	_ fs.FileReleaser = (*handle)(nil)
)

func (h *handle) Release(ctx context.Context) syscall.Errno {
	h.n.mu.Lock()
	h.n.cachedOpens--
	h.n.mu.Unlock()
	h.mu.Lock()
	if h.local != nil {
		h.local.Close()
	}
	h.mu.Unlock()
	return 0
}

// localFile returns the local file once the layer is local, else nil.
func (h *handle) localFile() *os.File {
	dir := h.n.l.localDir()
	if dir == "" {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.local == nil {
		f, err := openBeneath(dir, h.n.relPath())
		if err != nil {
			return nil // keep reading chunks
		}
		h.local = f
	}
	return h.local
}

// readAhead is how far past a sequential read its chunks are fetched.
const readAhead = 8 << 20

func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h.mu.Lock()
	ahead := int64(0)
	if off == h.nextOff && off > 0 {
		ahead = readAhead
	}
	h.nextOff = off + int64(len(dest))
	h.mu.Unlock()

	l, e := h.n.l, h.n.entry()
	l.reads.Add(1)
	if f := h.localFile(); f != nil {
		n, err := f.ReadAt(dest, off)
		if err != nil && err != io.EOF {
			return nil, fs.ToErrno(err)
		}
		return fuse.ReadResultData(dest[:n]), 0
	}
	start := time.Now()
	n, err := l.f.readAt(ctx, l.ix.fileChunks(e), e.size, dest, off, ahead)
	l.f.metrics.OnDemandRead(time.Since(start))
	if err != nil && n == 0 && off < e.size {
		entry := log.G(ctx).WithError(err).WithFields(log.Fields{
			"layer": l.f.layer, "file": "/" + h.n.relPath(), "offset": off,
		})
		if errors.Is(err, errRetrying) {
			// The kernel retrying a read that failed a moment ago,
			// which the log has already told.
			entry.Debug("lazy read failed")
		} else {
			entry.Error("lazy read failed")
		}
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest[:n]), 0
}
