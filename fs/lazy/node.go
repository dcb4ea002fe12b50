package lazy

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/lazylayer/lazylayer/fs/fusefd"
)

// rawFS serves a layer with go-fuse's raw API, so that the node id the
// kernel knows an inode by follows from the layer's index alone: entry
// num is node num+1+len(prefix), and directory d of the prefix chain
// (the mount root being 0) is node d+1. A daemon that takes the FUSE
// connection over from another (fusefd) answers the kernel's node ids
// without having seen their lookups.
//
// The kernel refuses to mix passthrough and page-cache opens of one inode
// (the second kind gets EIO), and gives one inode one backing file: rawFS
// counts each node's opens of each kind, opens a file with passthrough
// only while it has no page-cache opens, and shares one backing file
// between a node's passthrough opens.
type rawFS struct {
	fuse.RawFileSystem // ENOSYS for everything not below
	l                  *Layer
	prefix             []string // names of the chain a data mount serves the layer under
	entryIno           uint64   // first inode number of the prefix chain's directories

	server *fuse.Server // set by Init, before any request
	// save, if set, records the state a next daemon needs (persist).
	save      func(state []byte) error
	persistMu sync.Mutex // orders saves
	// gate is held shared by Open and Release, and for good by stop: a
	// daemon handing the connection over answers none after it recorded
	// the open files (the kernel sends those requests again to the next).
	gate sync.RWMutex
	// crashed: the connection was taken over without the last daemon's
	// open files (it crashed). Any inode may have opens of either kind
	// the kernel keeps, so no new backing file is registered: inodes
	// with a backing file of that daemon get it, others page-cache opens.
	crashed bool

	mu      sync.Mutex
	nodes   map[uint32]*nodeState // entries with open files; guarded by mu
	handles map[uint64]*handle    // open files by handle id; guarded by mu
	nextFh  uint64                // guarded by mu
	lookups map[uint32]uint64     // data mounts: kernel lookups of regular files; guarded by mu
	paths   map[uint32]string     // entry paths seen in lookups; guarded by mu
	allOnce sync.Once
	all     []string // every entry's path, built once a node id arrives unseen

	// Directory read-ahead (dirahead.go); parents and dirMisses are
	// guarded by mu.
	parents   map[uint32]uint32 // directory of each regular file looked up
	dirMisses map[uint32]uint8  // files of a directory missed, or dirAheadDone
	ahead     chan dirAheadReq  // directories to read ahead
}

// nodeState is what rawFS tracks of an entry with open files.
type nodeState struct {
	cachedOpens int      // handles served through the page cache
	passOpens   int      // handles with FUSE passthrough
	backing     int32    // backing id of the passthrough opens; 0: none
	backingFile *os.File // the local file registered as backing
	inherited   bool     // backing is a crashed daemon's: opens it does not know may use it
}

func newRawFS(l *Layer, prefix []string) *rawFS {
	return &rawFS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		l:             l, prefix: prefix, entryIno: uint64(len(l.ix.entries)) + 2,
		nodes: map[uint32]*nodeState{}, handles: map[uint64]*handle{}, nextFh: firstFh(),
		lookups: map[uint32]uint64{}, paths: map[uint32]string{0: ""},
		parents: map[uint32]uint32{}, dirMisses: map[uint32]uint8{}, ahead: make(chan dirAheadReq, dirAheadQueue),
	}
}

// firstFh is the first file handle a daemon hands out: the clock, in
// nanoseconds. A daemon that takes a connection over after a crash knows
// none of the handles the crashed one handed out, and the kernel still
// holds them: had it started from 1 like the crashed one, a new open
// could get the handle of a file opened before, and reads of that file
// would be served from the new one (TestRestartHandover saw it once,
// under load). From the clock, its handles are above every handle the
// daemons before it handed out: each ran for more nanoseconds than it
// opened files.
func firstFh() uint64 { return max(uint64(time.Now().UnixNano()), 1) }

func (r *rawFS) String() string              { return "lazylayer" }
func (r *rawFS) Init(s *fuse.Server)         { r.server = s }
func (r *rawFS) entryNode(num uint32) uint64 { return uint64(num) + 1 + uint64(len(r.prefix)) }

// decode returns the entry of node id, or the depth of a prefix directory
// (isEntry false); ok is false for an id this layer never gives.
func (r *rawFS) decode(id uint64) (num uint32, depth int, isEntry, ok bool) {
	p := uint64(len(r.prefix))
	switch {
	case id >= p+1 && id-p-1 < uint64(len(r.l.ix.entries)):
		return uint32(id - p - 1), 0, true, true
	case id >= 1 && id <= p:
		return 0, int(id - 1), false, true
	}
	return 0, 0, false, false
}

// path returns the path of entry num relative to the layer root.
func (r *rawFS) path(num uint32) string {
	r.mu.Lock()
	p, ok := r.paths[num]
	r.mu.Unlock()
	if ok {
		return p
	}
	r.allOnce.Do(func() { r.all = r.l.ix.allPaths() })
	return r.all[num]
}

func (r *rawFS) dirAttr(depth int, out *fuse.Attr) {
	*out = fuse.Attr{Ino: r.entryIno + uint64(depth), Mode: syscall.S_IFDIR | 0o755, Nlink: 2, Blksize: 4096}
}

func (r *rawFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	num, depth, isEntry, ok := r.decode(h.NodeId)
	if !ok {
		return fuse.Status(syscall.ESTALE)
	}
	out.SetEntryTimeout(entryTimeout)
	out.SetAttrTimeout(entryTimeout)
	if !isEntry {
		if name != r.prefix[depth] {
			return fuse.OK // NodeId 0: a negative entry the kernel caches
		}
		if depth+1 < len(r.prefix) {
			out.NodeId = uint64(depth + 2)
			r.dirAttr(depth+1, &out.Attr)
			return fuse.OK
		}
		out.NodeId = r.entryNode(0)
		r.l.attr(0, &out.Attr)
		return fuse.OK
	}
	e := &r.l.ix.entries[num]
	if e.mode&syscall.S_IFMT != syscall.S_IFDIR {
		return fuse.ENOTDIR
	}
	child, found := r.l.ix.lookup(e, name)
	if !found {
		return fuse.OK
	}
	out.NodeId = r.entryNode(child)
	r.l.attr(child, &out.Attr)
	p := name
	if parent := r.path(num); parent != "" {
		p = parent + "/" + name
	}
	r.mu.Lock()
	if _, ok := r.paths[child]; !ok {
		r.paths[child] = p
	}
	if r.l.ix.entries[child].mode&syscall.S_IFMT == syscall.S_IFREG {
		r.parents[child] = num
	}
	if len(r.prefix) > 0 && r.l.ix.entries[child].mode&syscall.S_IFMT == syscall.S_IFREG {
		if r.lookups[child] == 0 {
			// The kernel did not hold this file.
			r.l.bound.Add(1)
		}
		r.lookups[child]++
	}
	r.mu.Unlock()
	return fuse.OK
}

func (r *rawFS) Forget(nodeid, nlookup uint64) {
	num, _, isEntry, ok := r.decode(nodeid)
	if !ok || !isEntry {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	n, ok := r.lookups[num]
	if !ok {
		return // looked up by an earlier daemon
	}
	if n <= nlookup {
		delete(r.lookups, num)
		r.l.bound.Add(-1)
		return
	}
	r.lookups[num] = n - nlookup
}

func (r *rawFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	num, depth, isEntry, ok := r.decode(in.NodeId)
	if !ok {
		return fuse.Status(syscall.ESTALE)
	}
	if isEntry {
		r.l.attr(num, &out.Attr)
	} else {
		r.dirAttr(depth, &out.Attr)
	}
	out.SetTimeout(entryTimeout)
	return fuse.OK
}

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

// OpenDir lets the kernel cache directory listings: layers never change.
func (r *rawFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	num, _, isEntry, ok := r.decode(in.NodeId)
	if !ok {
		return fuse.Status(syscall.ESTALE)
	}
	if isEntry && r.l.ix.entries[num].mode&syscall.S_IFMT != syscall.S_IFDIR {
		return fuse.ENOTDIR
	}
	out.OpenFlags = fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE
	return fuse.OK
}

func (r *rawFS) ReleaseDir(in *fuse.ReleaseIn) {}

// ReadDir lists a directory statelessly: the offset after child i is i+1.
func (r *rawFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	num, depth, isEntry, ok := r.decode(in.NodeId)
	if !ok {
		return fuse.Status(syscall.ESTALE)
	}
	if !isEntry {
		if in.Offset == 0 {
			ino := r.entryIno + uint64(depth) + 1
			if depth+1 == len(r.prefix) {
				ino = 1
			}
			out.AddDirEntry(fuse.DirEntry{Name: r.prefix[depth], Mode: syscall.S_IFDIR, Ino: ino, Off: 1})
		}
		return fuse.OK
	}
	ix := r.l.ix
	e := &ix.entries[num]
	kids, names := ix.dirChildren(e), ix.dirNames(e)
	for i := in.Offset; i < uint64(len(kids)); i++ {
		k := kids[i]
		if !out.AddDirEntry(fuse.DirEntry{Name: names[i], Mode: ix.entries[k].mode, Ino: uint64(k) + 1, Off: i + 1}) {
			break
		}
	}
	return fuse.OK
}

func (r *rawFS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	num, _, isEntry, ok := r.decode(h.NodeId)
	if !ok || !isEntry {
		return nil, fuse.EINVAL
	}
	target, ok := r.l.ix.links[num]
	if !ok {
		return nil, fuse.EINVAL
	}
	return []byte(target), fuse.OK
}

func (r *rawFS) xattrs(id uint64) map[string][]byte {
	if num, _, isEntry, ok := r.decode(id); ok && isEntry {
		return r.l.ix.xattrs[num]
	}
	return nil
}

func (r *rawFS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	v, ok := r.xattrs(h.NodeId)[attr]
	if !ok {
		return 0, fuse.ENOATTR
	}
	if len(dest) < len(v) {
		return uint32(len(v)), fuse.ERANGE
	}
	return uint32(copy(dest, v)), fuse.OK
}

func (r *rawFS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	xa := r.xattrs(h.NodeId)
	var size int
	for k := range xa {
		size += len(k) + 1
	}
	if len(dest) < size {
		return uint32(size), fuse.ERANGE
	}
	i := 0
	for k := range xa {
		i += copy(dest[i:], k)
		dest[i] = 0
		i++
	}
	return uint32(size), fuse.OK
}

func (r *rawFS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize = 4096
	out.NameLen = 255
	out.Files = uint64(len(r.l.ix.entries))
	return fuse.OK
}

// Flush answers ENOSYS: the tree is read-only, and the kernel then stops
// sending a FLUSH round trip on every close.
func (r *rawFS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status { return fuse.ENOSYS }

func (r *rawFS) node(num uint32) *nodeState {
	st := r.nodes[num]
	if st == nil {
		st = &nodeState{}
		r.nodes[num] = st
	}
	return st
}

func (r *rawFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.Flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC) != 0 {
		return fuse.EROFS
	}
	num, _, isEntry, ok := r.decode(in.NodeId)
	if !ok {
		return fuse.Status(syscall.ESTALE)
	}
	if !isEntry || r.l.ix.entries[num].mode&syscall.S_IFMT != syscall.S_IFREG {
		return fuse.EINVAL
	}
	rel := r.path(num)
	r.l.recordOpen(num, rel)
	registered := false
	defer func() {
		// Before the kernel learns the backing id: a daemon that
		// follows a crash must give this inode's later opens the same.
		if registered {
			r.persist(false)
		}
	}()
	r.gate.RLock()
	defer r.gate.RUnlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.node(num)
	if local := r.l.localDir(); local != "" && r.l.passthrough && !r.l.noPassthrough.Load() && st.cachedOpens == 0 {
		if st.backing == 0 && !r.crashed {
			r.register(st, local, rel)
			registered = st.backing != 0
		}
		if st.backing != 0 {
			st.passOpens++
			out.Fh = r.addHandle(&handle{r: r, num: num, pass: true})
			out.OpenFlags |= fuse.FOPEN_PASSTHROUGH
			out.BackingID = st.backing
			return fuse.OK
		}
	}
	if st.passOpens > 0 {
		// Page-cache opens cannot join passthrough ones.
		return fuse.EIO
	}
	st.cachedOpens++
	out.Fh = r.addHandle(&handle{r: r, num: num})
	out.OpenFlags |= fuse.FOPEN_KEEP_CACHE
	return fuse.OK
}

// register opens the local file rel and registers it as st's backing file,
// if it is there. A registration the kernel refuses turns passthrough off
// for the layer.
func (r *rawFS) register(st *nodeState, local, rel string) {
	f, err := openBeneath(local, rel)
	if err != nil {
		if r.l.complete.Load() || !errors.Is(err, os.ErrNotExist) {
			log.L.WithError(err).WithField("layer", r.l.desc.Digest).Warn("cannot open local file for passthrough")
		}
		return
	}
	id, errno := r.server.RegisterBackingFd(&fuse.BackingMap{Fd: int32(f.Fd())})
	if errno != 0 {
		f.Close()
		if !r.l.noPassthrough.Swap(true) {
			log.L.WithError(errno).WithField("layer", r.l.desc.Digest).Warn("the kernel refuses FUSE passthrough for this mount; local files are read through the daemon")
		}
		return
	}
	st.backing, st.backingFile = id, f
}

func (r *rawFS) addHandle(h *handle) uint64 {
	fh := r.nextFh
	r.nextFh++
	r.handles[fh] = h
	return fh
}

// handleOf returns the handle fh of node id. A handle an earlier daemon
// opened is unknown here: it is read as a page-cache handle.
func (r *rawFS) handleOf(id, fh uint64) *handle {
	r.mu.Lock()
	defer r.mu.Unlock()
	if h := r.handles[fh]; h != nil {
		return h
	}
	num, _, isEntry, ok := r.decode(id)
	if !ok || !isEntry {
		return nil
	}
	h := &handle{r: r, num: num}
	r.handles[fh] = h
	r.node(num).cachedOpens++
	if fh >= r.nextFh {
		r.nextFh = fh + 1
	}
	return h
}

func (r *rawFS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	r.gate.RLock()
	defer r.gate.RUnlock()
	r.mu.Lock()
	h := r.handles[in.Fh]
	delete(r.handles, in.Fh)
	if h == nil {
		r.mu.Unlock()
		return
	}
	st := r.node(h.num)
	if h.pass {
		st.passOpens--
	} else {
		st.cachedOpens--
	}
	var backing int32
	var bf *os.File
	if st.passOpens == 0 && st.backing != 0 && !st.inherited {
		backing, bf = st.backing, st.backingFile
		st.backing, st.backingFile = 0, nil
	}
	if st.passOpens == 0 && st.cachedOpens == 0 && st.backing == 0 {
		delete(r.nodes, h.num)
	}
	r.mu.Unlock()
	if backing != 0 {
		// Recorded first: a daemon that follows a crash must not hand
		// out an id that is gone.
		r.persist(false)
		r.server.UnregisterBackingFd(backing)
		if bf != nil {
			bf.Close()
		}
	}
	h.mu.Lock()
	if h.local != nil {
		h.local.Close()
	}
	h.mu.Unlock()
}

func (r *rawFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	h := r.handleOf(in.NodeId, in.Fh)
	if h == nil {
		return nil, fuse.Status(syscall.ESTALE)
	}
	ctx := &fuse.Context{Caller: in.Caller, Cancel: cancel}
	return h.read(ctx, buf, int64(in.Offset))
}

// handle is an open regular file. Until its file is local it reads
// chunks, fetching ahead on sequential reads; then it reads the local
// file. A passthrough handle is read here only if the kernel declined
// passthrough.
type handle struct {
	r    *rawFS
	num  uint32
	pass bool

	mu      sync.Mutex
	nextOff int64    // where a sequential read would continue; guarded by mu
	local   *os.File // the local file, once there is one; guarded by mu
}

// localFile returns the local file once it is there, else nil.
func (h *handle) localFile() *os.File {
	dir := h.r.l.localDir()
	if dir == "" {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.local == nil {
		f, err := openBeneath(dir, h.r.path(h.num))
		if err != nil {
			return nil // keep reading chunks
		}
		h.local = f
	}
	return h.local
}

// readAhead is how far past a sequential read its chunks are fetched.
const readAhead = 8 << 20

func (h *handle) read(ctx *fuse.Context, dest []byte, off int64) (fuse.ReadResult, fuse.Status) {
	h.mu.Lock()
	ahead := int64(0)
	if off == h.nextOff && off > 0 {
		ahead = readAhead
	}
	h.nextOff = off + int64(len(dest))
	h.mu.Unlock()

	l := h.r.l
	e := &l.ix.entries[h.num]
	l.reads.Add(1)
	if f := h.localFile(); f != nil {
		n, err := f.ReadAt(dest, off)
		if err != nil && err != io.EOF {
			return nil, fuse.ToStatus(err)
		}
		return fuse.ReadResultData(dest[:n]), fuse.OK
	}
	if off == 0 {
		h.r.noteRead(h.num)
	}
	// A container reads on demand: population yields to it, whether
	// this read needs the registry or not.
	l.f.act.start()
	start := time.Now()
	n, err := l.f.readAt(ctx, l.ix.fileChunks(e), e.size, dest, off, ahead)
	l.f.act.done()
	l.f.metrics.OnDemandRead(time.Since(start))
	if err != nil && n == 0 && off < e.size {
		entry := log.G(ctx).WithError(err).WithFields(log.Fields{
			"layer": l.f.layer, "file": "/" + h.r.path(h.num), "offset": off,
		})
		if errors.Is(err, errRetrying) {
			// The kernel retrying a read that failed a moment ago,
			// which the log has already told.
			entry.Debug("lazy read failed")
		} else {
			entry.Error("lazy read failed")
		}
		return nil, fuse.EIO
	}
	return fuse.ReadResultData(dest[:n]), fuse.OK
}

// allPaths returns the path of every entry relative to the layer root (a
// hard-linked file's first), walking the tree from the root.
func (ix *index) allPaths() []string {
	paths := make([]string, len(ix.entries))
	seen := make([]bool, len(ix.entries))
	seen[0] = true
	queue := []uint32{0}
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		e := &ix.entries[d]
		if e.mode&syscall.S_IFMT != syscall.S_IFDIR {
			continue
		}
		for i, k := range ix.dirChildren(e) {
			if seen[k] {
				continue
			}
			seen[k] = true
			paths[k] = ix.dirNames(e)[i]
			if paths[d] != "" {
				paths[k] = paths[d] + "/" + paths[k]
			}
			queue = append(queue, k)
		}
	}
	return paths
}

// rawState is what a daemon that takes a connection over needs of the
// last one's: the backing files registered on the connection (recorded
// whenever one is registered or closed, so a crash keeps them), and, at a
// stop, the open files.
type rawState struct {
	Backing map[uint32]int32 `json:"backing,omitempty"` // backing id by entry
	Handles []heldHandle     `json:"handles,omitempty"`
	Stopped bool             `json:"stopped,omitempty"` // Handles are complete: the daemon stopped
}

type heldHandle struct {
	Fh   uint64 `json:"fh"`
	Num  uint32 `json:"num"`
	Pass bool   `json:"pass,omitempty"`
}

// stop makes r answer no more opens and releases, for good, and records
// its state with the open files for the next daemon.
func (r *rawFS) stop() error {
	r.gate.Lock()
	return r.persist(true)
}

// persist records r's state with the held connection; withHandles adds
// the open files (the daemon stops: no request is answered after this).
func (r *rawFS) persist(withHandles bool) error {
	if r.save == nil {
		return nil
	}
	r.persistMu.Lock()
	defer r.persistMu.Unlock()
	st := rawState{Backing: map[uint32]int32{}}
	r.mu.Lock()
	for num, n := range r.nodes {
		if n.backing != 0 {
			st.Backing[num] = n.backing
		}
	}
	if withHandles {
		st.Stopped = true
		for fh, h := range r.handles {
			st.Handles = append(st.Handles, heldHandle{Fh: fh, Num: h.num, Pass: h.pass})
		}
	}
	r.mu.Unlock()
	b, err := json.Marshal(st)
	if err == nil && len(b) > fusefd.MaxState {
		// Too many open files to record: the next daemon takes the
		// connection over as after a crash.
		st.Handles, st.Stopped = nil, false
		b, err = json.Marshal(st)
	}
	if err != nil {
		return err
	}
	return r.save(b)
}

// restore takes over the state the last daemon recorded. A backing id it
// names stays registered on the connection, and the inode's passthrough
// opens share it; its open files are counted as open. After a crash (no
// complete list of open files) open files are learnt as they are read, as
// page-cache opens, the crashed daemon's backing ids are never closed, and
// no new one is registered (see crashed).
func (r *rawFS) restore(b []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.crashed = true
	if len(b) == 0 {
		return nil
	}
	var st rawState
	if err := json.Unmarshal(b, &st); err != nil {
		return err
	}
	r.crashed = !st.Stopped
	for num, id := range st.Backing {
		if int(num) < len(r.l.ix.entries) && id != 0 {
			n := r.node(num)
			n.backing, n.inherited = id, r.crashed
		}
	}
	for _, h := range st.Handles {
		if int(h.Num) >= len(r.l.ix.entries) {
			continue
		}
		r.handles[h.Fh] = &handle{r: r, num: h.Num, pass: h.Pass}
		if h.Pass {
			r.node(h.Num).passOpens++
		} else {
			r.node(h.Num).cachedOpens++
		}
		if h.Fh >= r.nextFh {
			r.nextFh = h.Fh + 1
		}
	}
	return nil
}

// fingerprint digests how the index numbers the layer's entries (each
// directory's children and their names, each entry's type and size): two
// daemons serve one FUSE connection only if they number entries alike,
// since node ids follow entry numbers.
func (ix *index) fingerprint() string {
	h := sha256.New()
	var b [8]byte
	for i := range ix.entries {
		e := &ix.entries[i]
		binary.LittleEndian.PutUint32(b[:4], e.mode)
		binary.LittleEndian.PutUint32(b[4:], uint32(e.size))
		h.Write(b[:])
	}
	for i, c := range ix.children {
		binary.LittleEndian.PutUint32(b[:4], c)
		h.Write(b[:4])
		h.Write([]byte(ix.names[i]))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))
}
