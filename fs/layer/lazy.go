package layer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/fs/meta"
)

// Files a lazy layer keeps in its snapshot directory, so that it can be
// mounted again after a restart without the registry.
const (
	lazyDescFile = "layer.json" // the image reference and layer descriptor
	lazyTOCFile  = "toc"        // footer and TOC bytes (lazy.Recorded)
	lazyBlobFile = "blob"       // the blob as population downloads it
	// lazyReleasedFile records that the layer's population was released,
	// so that the next daemon resumes it at once, whatever its Policy.
	lazyReleasedFile = "populate"
	// noMetaFile records that the layer is served with a data mount but
	// without a metadata tree, which could not be built (native.go).
	noMetaFile = "nometa"
	lazyMount  = "lazy"
)

// Lazy is a layer the Manager serves lazily at dir/lazy. Once Start is
// called, its population (the background download that turns it local)
// belongs to it: it starts when the Manager's Policy says, calls the
// snapshotter's local, and retires the FUSE mount when the last container
// started from it is gone.
type Lazy struct {
	m    *Manager
	dir  string // snapshot directory
	ref  string
	desc ocispec.Descriptor
	// diffID is the image config's diff ID of the layer, if containerd
	// gave it: population checks it (lazy.PopulateOptions.DiffID).
	diffID digest.Digest
	layer  *lazy.Layer
	// native: containers see the layer through its metadata tree, and
	// population places files in the data directory (native.go).
	native bool
	// metaDone is closed once the metadata tree of a native layer is
	// built or given up (at once for others); metaBuilt says which.
	metaDone  chan struct{}
	metaBuilt atomic.Bool

	ctx    context.Context // population and retiring; cancelled by Release
	cancel context.CancelFunc
	state  atomic.Value  // string: stateLazy, statePopulating, stateLocal or stateFailed
	begin  chan struct{} // closed when population may start
	local  chan struct{} // closed when the layer is local
	failed chan struct{} // closed when population gave up
	exited chan struct{} // closed when the population goroutine returns; nil before Start

	mu       sync.Mutex
	started  bool            // Start was called; guarded by mu
	released bool            // begin is closed; guarded by mu
	err      error           // why population gave up; guarded by mu
	detached <-chan struct{} // set once the FUSE mount is unmounted; guarded by mu
}

type savedLayer struct {
	Ref        string             `json:"ref"`
	Descriptor ocispec.Descriptor `json:"descriptor"`
	// DiffID is the diff ID the image config gives the layer
	// (containerd's label), which population checks; empty if
	// containerd gave none (or an earlier version saved the layer).
	DiffID digest.Digest `json:"diffID,omitempty"`
}

func (m *Manager) lazyCapable(desc ocispec.Descriptor) bool {
	if m.cfg.Lazy.Cache == nil {
		return false
	}
	_, ok := lazy.Capable(desc)
	return ok
}

// mountLazy reads the layer's TOC from the registry, saves it in dir and
// mounts the layer at dir/lazy.
func (m *Manager) mountLazy(ctx context.Context, dir, ref string, desc ocispec.Descriptor, diffID digest.Digest, ph phases) (*Lazy, error) {
	tocDigest, _ := lazy.Capable(desc)
	blob, err := m.reg.Ranges(ctx, ref, desc)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	var l *lazy.Layer
	rec, ahead := m.claimTOC(ctx, desc.Digest)
	if rec != nil {
		ph.since("claim", start)
		t := time.Now()
		l, err = lazy.Open(ctx, rec, blob, desc, tocDigest, m.lazyOptions(dir))
		if err != nil {
			log.G(ctx).WithError(err).WithField("layer", desc.Digest).Warn("the TOC read ahead does not open; reading it again")
		}
		ph.since("open", t)
	}
	if l == nil {
		t := time.Now()
		ra := &timedReaderAt{r: blobReaderAt{ctx: ctx, b: blob}}
		if l, err = lazy.Open(ctx, ra, blob, desc, tocDigest, m.lazyOptions(dir)); err != nil {
			return nil, err
		}
		ph.since("open", t)
		ph["fetch"], ph["requests"] = ra.spent.Round(time.Millisecond), ra.n
	}
	t := time.Now()
	if err := l.SaveTOC(filepath.Join(dir, lazyTOCFile)); err != nil {
		l.Close()
		return nil, err
	}
	b, err := json.Marshal(savedLayer{Ref: ref, Descriptor: desc, DiffID: diffID})
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, lazyDescFile), b, 0o600)
	}
	if err != nil {
		l.Close()
		return nil, err
	}
	ph.since("save", t)
	ll, err := m.mount(ctx, dir, ref, desc, diffID, l, ph, true)
	if err != nil {
		return nil, err
	}
	if ahead != nil && ahead.ahead != nil {
		// What the profile's replay fetched before the mount belongs in
		// the blob copy, or population fetches it again.
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			select {
			case <-ahead.ahead:
			case <-ll.ctx.Done():
				return
			}
			if ahead.fetchedAhead != nil {
				l.Keep(ll.ctx, ahead.fetchedAhead)
			}
		}()
	}
	ph["layer"], ph["entries"], ph["elapsed"] = desc.Digest, l.Entries(), time.Since(start).Round(time.Millisecond)
	log.G(ctx).WithFields(log.Fields(ph)).Info("layer mounted lazily")
	return ll, nil
}

// tocJob reads the footer and TOC of a lazy-capable layer before
// containerd asks for it: containerd prepares an image's layers one after
// another, and each TOC read costs round trips.
type tocJob struct {
	done   chan struct{} // closed when rec and err are set
	rec    *lazy.Recorded
	err    error
	expire *time.Timer // forgets an unclaimed TOC; guarded by Manager.mu
	// ahead, if not nil, is closed when the replay of the layer's access
	// profile from the TOC read ahead is over; fetchedAhead is then what
	// it fetched, for the mounted layer's blob copy.
	ahead        chan struct{}
	fetchedAhead *lazy.Recorded
}

// startTOC starts reading the TOC of desc unless that is under way.
func (m *Manager) startTOC(ref string, desc ocispec.Descriptor) {
	tocDigest, _ := lazy.Capable(desc)
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.tocs[desc.Digest]; ok || m.closed {
		return
	}
	j := &tocJob{done: make(chan struct{})}
	m.tocs[desc.Digest] = j
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer close(j.done)
		// Part of the pull: population yields to it.
		defer m.cfg.Lazy.Activity.Begin()()
		blob, err := m.reg.Ranges(m.ctx, ref, desc)
		if err == nil {
			j.rec, err = lazy.ReadTOC(blobReaderAt{ctx: m.ctx, b: blob}, desc, tocDigest)
		}
		if err == nil && m.cfg.Lazy.ProfileDir != "" {
			// The layer's access profile need not wait for its mount.
			j.ahead = make(chan struct{})
			m.wg.Add(1)
			go func() {
				defer m.wg.Done()
				defer close(j.ahead)
				j.fetchedAhead = lazy.ReplayAhead(m.ctx, j.rec, blob, desc, tocDigest, m.cfg.Lazy)
			}()
		}
		j.err = err
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.tocs[desc.Digest] == j {
			j.expire = time.AfterFunc(m.cfg.StagedTTL, func() {
				m.mu.Lock()
				defer m.mu.Unlock()
				if m.tocs[desc.Digest] == j {
					delete(m.tocs, desc.Digest)
				}
			})
		}
	}()
}

// claimTOC returns the TOC of layer d read ahead, waiting for it if the
// read is under way, or nil if there is none or it failed: the caller
// then reads it itself, and meets the failure with its own context. It
// also returns the read's job, if there was one, for its replay ahead.
func (m *Manager) claimTOC(ctx context.Context, d digest.Digest) (*lazy.Recorded, *tocJob) {
	m.mu.Lock()
	j, ok := m.tocs[d]
	if ok {
		delete(m.tocs, d)
		if j.expire != nil {
			j.expire.Stop()
		}
	}
	m.mu.Unlock()
	if !ok {
		return nil, nil
	}
	select {
	case <-j.done:
	case <-ctx.Done():
		return nil, nil
	}
	if j.err != nil {
		log.G(ctx).WithError(j.err).WithField("layer", d).Debug("reading the TOC ahead failed")
		return nil, nil
	}
	return j.rec, j
}

// lazyOptions are the options of the lazy layer in snapshot directory dir.
func (m *Manager) lazyOptions(dir string) lazy.Options {
	o := m.cfg.Lazy
	o.BlobPath = filepath.Join(dir, lazyBlobFile)
	return o
}

// mount serves l at dir/lazy, with its metadata tree when native metadata
// is on: built before mount returns, or, when later is true, after
// (mounts of the layer wait for it, see WaitPresent). Its population
// starts with Start.
func (m *Manager) mount(ctx context.Context, dir, ref string, desc ocispec.Descriptor, diffID digest.Digest, l *lazy.Layer, ph phases, later bool) (*Lazy, error) {
	native := m.cfg.Native
	if native {
		if err := m.mountNative(ctx, dir, l, ph); err != nil {
			log.G(ctx).WithError(err).WithField("layer", desc.Digest).
				Warn("cannot serve the layer with native metadata; containers read its metadata through FUSE")
			native = false
		}
	}
	if !native {
		if err := l.Mount(ctx, filepath.Join(dir, lazyMount)); err != nil {
			l.Close()
			return nil, err
		}
	}
	popCtx, cancel := context.WithCancel(m.ctx)
	ll := &Lazy{
		m: m, dir: dir, ref: ref, desc: desc, diffID: diffID, layer: l, native: native,
		ctx: popCtx, cancel: cancel, metaDone: make(chan struct{}),
		begin: make(chan struct{}), local: make(chan struct{}), failed: make(chan struct{}),
	}
	ll.state.Store(stateLazy)
	m.mu.Lock()
	m.lazy[dir] = ll
	building := native && !m.closed
	if building {
		m.wg.Add(1)
	}
	m.mu.Unlock()
	switch {
	case building && later:
		// The tree is the end of the layer's pull, and a container's
		// start waits for it: population yields to it as to the
		// Prepare it follows, from before Prepare returns.
		end := m.cfg.Lazy.Activity.Begin()
		go func() {
			defer end()
			m.finishNative(ll)
		}()
	case building:
		m.finishNative(ll)
	default:
		close(ll.metaDone)
	}
	return ll, nil
}

// Restore implements snapshot.FileSystem: it mounts the lazy layer of dir
// again from the TOC saved there. The registry is needed only for reads of
// chunks that are not cached.
func (m *Manager) Restore(ctx context.Context, dir string, _ map[string]string) (*Lazy, error) {
	if m.cfg.Lazy.Cache == nil {
		return nil, errors.New("lazy layers are disabled")
	}
	b, err := os.ReadFile(filepath.Join(dir, lazyDescFile))
	if err != nil {
		return nil, err
	}
	var saved savedLayer
	if err := json.Unmarshal(b, &saved); err != nil {
		return nil, fmt.Errorf("%s: %w", lazyDescFile, err)
	}
	tocDigest, ok := lazy.Capable(saved.Descriptor)
	if !ok {
		return nil, fmt.Errorf("%s: not a lazy layer", lazyDescFile)
	}
	rec, err := lazy.LoadRecorded(filepath.Join(dir, lazyTOCFile))
	if err != nil {
		return nil, err
	}
	blob, err := m.reg.Ranges(ctx, saved.Ref, saved.Descriptor)
	if err != nil {
		return nil, err
	}
	// A mount left by a daemon that died answers nothing (ENOTCONN),
	// unless its FUSE connection was kept: then it is served again.
	if h := m.cfg.Lazy.Handover; h == nil || !h.Holds(filepath.Join(dir, lazyMount)) {
		if err := m.detachStale(ctx, dir); err != nil {
			return nil, err
		}
	}
	l, err := lazy.Open(ctx, rec, blob, saved.Descriptor, tocDigest, m.lazyOptions(dir))
	if err != nil {
		return nil, err
	}
	return m.mount(ctx, dir, saved.Ref, saved.Descriptor, saved.DiffID, l, nil, false)
}

// Release implements snapshot.FileSystem: it stops the population of the
// lazy layer of dir, waits for it to end, and detaches its mount. Overlays
// still using the mount keep it until they are unmounted.
func (m *Manager) Release(ctx context.Context, dir string) error {
	m.mu.Lock()
	ll, ok := m.lazy[dir]
	delete(m.lazy, dir)
	m.mu.Unlock()
	if !ok {
		if served, err := m.serveRetiring(ctx, dir); served || err != nil {
			return err
		}
		for _, f := range []string{lazyTOCFile, lazyDescFile, lazyReleasedFile} {
			os.Remove(filepath.Join(dir, f))
		}
		return m.detachStale(ctx, dir)
	}
	if err := ll.stop(ctx); err != nil {
		return err
	}
	for _, f := range []string{lazyTOCFile, lazyDescFile, lazyBlobFile, lazyReleasedFile} {
		os.Remove(filepath.Join(dir, f))
	}
	return nil
}

// stop ends ll's population, waits for it, and detaches its mount. What
// is saved in its directory stays, for a restart.
func (ll *Lazy) stop(ctx context.Context) error {
	if err := ll.endPopulation(ctx); err != nil {
		return err
	}
	ll.layer.Close()
	_, err := ll.detach()
	return err
}

// endPopulation cancels ll's population and the building of its metadata
// tree, and waits for them to return.
func (ll *Lazy) endPopulation(ctx context.Context) error {
	ll.cancel()
	select {
	case <-ll.metaDone:
	case <-ctx.Done():
		return ctx.Err()
	}
	ll.mu.Lock()
	exited := ll.exited
	ll.mu.Unlock()
	if exited == nil {
		return nil
	}
	select {
	case <-exited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// leave ends ll's population, waits for it, and leaves its mount and FUSE
// connection to the next daemon (Config.Lazy.Handover).
func (ll *Lazy) leave(ctx context.Context) error {
	if err := ll.endPopulation(ctx); err != nil {
		return err
	}
	err := ll.layer.Close()
	ll.layer.Leave()
	return err
}

// detach unmounts the layer's FUSE mount, once; its server answers the
// overlays still using it, and done closes when the last is unmounted.
func (ll *Lazy) detach() (done <-chan struct{}, err error) {
	ll.mu.Lock()
	defer ll.mu.Unlock()
	if ll.detached == nil {
		if ll.detached, err = ll.layer.Unmount(); err != nil {
			return nil, err
		}
	}
	return ll.detached, nil
}

// detachStale detaches a FUSE mount at dir/lazy that no Lazy of this
// Manager serves: one left by a daemon that died, whose overlays now fail
// with ENOTCONN. It says how many overlays still use it.
func (m *Manager) detachStale(ctx context.Context, dir string) error {
	mp := filepath.Join(dir, lazyMount)
	users := overlayUsers(mp)
	err := unix.Unmount(mp, unix.MNT_DETACH)
	switch {
	case err == unix.EINVAL || err == unix.ENOENT:
		return nil // nothing mounted
	case err != nil:
		return fmt.Errorf("unmount %s: %w", mp, err)
	}
	lg := log.G(ctx).WithField("mountpoint", mp)
	if users > 0 {
		lg.WithField("overlays", users).Error("detached a dead FUSE mount of the last daemon that running containers still use: they cannot read this layer; restart them")
	} else {
		lg.Info("detached a FUSE mount left by the last daemon")
	}
	return nil
}

// blobReaderAt reads a blob with ranged requests under one context.
type blobReaderAt struct {
	ctx context.Context
	b   lazy.Blob
}

func (r blobReaderAt) ReadAt(p []byte, off int64) (int, error) {
	rc, err := r.b.ReadRange(r.ctx, off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	return io.ReadFull(rc, p)
}

// phases are the times the steps of a layer's mount took, logged with
// it. A nil phases records nothing.
type phases log.Fields

// since records that the step name took from start until now.
func (ph phases) since(name string, start time.Time) {
	if ph != nil {
		ph[name] = time.Since(start).Round(time.Millisecond)
	}
}

// timedReaderAt counts the reads of r and the time they took.
type timedReaderAt struct {
	r     io.ReaderAt
	n     int
	spent time.Duration
}

func (t *timedReaderAt) ReadAt(p []byte, off int64) (int, error) {
	start := time.Now()
	n, err := t.r.ReadAt(p, off)
	t.n++
	t.spent += time.Since(start)
	return n, err
}

// serveRetiring serves again the FUSE connection the last daemon kept for
// the local layer of dir, whose mount had not retired (overlays of
// containers started lazily still use it), and retires it as that daemon
// would have. It reports false if there is no such connection.
func (m *Manager) serveRetiring(ctx context.Context, dir string) (bool, error) {
	mp := filepath.Join(dir, lazyMount)
	h := m.cfg.Lazy.Handover
	if m.cfg.Lazy.Cache == nil || h == nil || !h.Holds(mp) {
		return false, nil
	}
	b, err := os.ReadFile(filepath.Join(dir, lazyDescFile))
	if err != nil {
		return false, nil
	}
	var saved savedLayer
	if err := json.Unmarshal(b, &saved); err != nil {
		return false, nil
	}
	tocDigest, ok := lazy.Capable(saved.Descriptor)
	if !ok {
		return false, nil
	}
	rec, err := lazy.LoadRecorded(filepath.Join(dir, lazyTOCFile))
	if err != nil {
		return false, nil
	}
	blob, err := m.reg.Ranges(ctx, saved.Ref, saved.Descriptor)
	if err != nil {
		return false, err
	}
	l, err := lazy.Open(ctx, rec, blob, saved.Descriptor, tocDigest, m.lazyOptions(dir))
	if err != nil {
		return false, err
	}
	tree, prefix := filepath.Join(dir, "fs"), ""
	native := false
	built := false
	if st, err := os.Stat(filepath.Join(dir, metaDir)); err == nil && st.IsDir() {
		built = true
	}
	_, err = os.Stat(filepath.Join(dir, noMetaFile))
	if (built || err == nil) && m.cfg.DataDir != "" {
		native, tree, prefix = true, m.placeDir(dir), meta.RedirectRoot+"/"+layerID(dir)
	}
	l.SetLocal(tree)
	resumed, err := l.Resume(ctx, mp, prefix)
	if err != nil || !resumed {
		l.Close()
		return false, err
	}
	l.DropBlob()
	ctx2, cancel := context.WithCancel(m.ctx)
	ll := &Lazy{
		m: m, dir: dir, ref: saved.Ref, desc: saved.Descriptor, layer: l, native: native,
		ctx: ctx2, cancel: cancel, metaDone: make(chan struct{}),
		begin: make(chan struct{}), local: make(chan struct{}), failed: make(chan struct{}),
		exited: make(chan struct{}),
	}
	ll.state.Store(stateLocal)
	ll.metaBuilt.Store(native && built)
	close(ll.metaDone)
	ll.started, ll.released = true, true
	close(ll.begin)
	close(ll.local)
	m.mu.Lock()
	m.lazy[dir] = ll
	m.mu.Unlock()
	go func() {
		defer close(ll.exited)
		m.retire(log.WithLogger(ctx2, log.G(ctx).WithField("layer", saved.Descriptor.Digest)), ll)
	}()
	return true, nil
}
