package layer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/fs/lazy"
)

// Files a lazy layer keeps in its snapshot directory, so that it can be
// mounted again after a restart without the registry.
const (
	lazyDescFile = "layer.json" // the image reference and layer descriptor
	lazyTOCFile  = "toc"        // footer and TOC bytes (lazy.Recorded)
	lazyBlobFile = "blob"       // the blob as population downloads it
	lazyMount    = "lazy"
)

// lazyLayer is a mounted lazy layer.
type lazyLayer struct {
	ref    string
	desc   ocispec.Descriptor
	layer  *lazy.Layer
	cancel context.CancelFunc // stops population
	state  atomic.Value       // string: stateLazy, statePopulating or stateLocal
}

type savedLayer struct {
	Ref        string             `json:"ref"`
	Descriptor ocispec.Descriptor `json:"descriptor"`
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
func (m *Manager) mountLazy(ctx context.Context, dir, ref string, desc ocispec.Descriptor) error {
	tocDigest, _ := lazy.Capable(desc)
	blob, err := m.reg.Ranges(ctx, ref, desc)
	if err != nil {
		return err
	}
	start := time.Now()
	var l *lazy.Layer
	if rec := m.claimTOC(ctx, desc.Digest); rec != nil {
		l, err = lazy.Open(ctx, rec, blob, desc, tocDigest, m.lazyOptions(dir))
		if err != nil {
			log.G(ctx).WithError(err).WithField("layer", desc.Digest).Warn("the TOC read ahead does not open; reading it again")
		}
	}
	if l == nil {
		if l, err = lazy.Open(ctx, blobReaderAt{ctx: ctx, b: blob}, blob, desc, tocDigest, m.lazyOptions(dir)); err != nil {
			return err
		}
	}
	if err := l.TOC().Save(filepath.Join(dir, lazyTOCFile)); err != nil {
		return err
	}
	b, err := json.Marshal(savedLayer{Ref: ref, Descriptor: desc})
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, lazyDescFile), b, 0o600); err != nil {
		return err
	}
	if err := m.mount(ctx, dir, &lazyLayer{ref: ref, desc: desc, layer: l}); err != nil {
		return err
	}
	log.G(ctx).WithFields(log.Fields{
		"layer": desc.Digest, "entries": l.Entries(), "elapsed": time.Since(start).Round(time.Millisecond),
	}).Info("layer mounted lazily")
	return nil
}

// tocJob reads the footer and TOC of a lazy-capable layer before
// containerd asks for it: containerd prepares an image's layers one after
// another, and each TOC read costs round trips.
type tocJob struct {
	done   chan struct{} // closed when rec and err are set
	rec    *lazy.Recorded
	err    error
	expire *time.Timer // forgets an unclaimed TOC; guarded by Manager.mu
}

// startTOC starts reading the TOC of desc unless that is under way.
func (m *Manager) startTOC(ref string, desc ocispec.Descriptor) {
	tocDigest, _ := lazy.Capable(desc)
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.tocs[desc.Digest]; ok {
		return
	}
	j := &tocJob{done: make(chan struct{})}
	m.tocs[desc.Digest] = j
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer close(j.done)
		blob, err := m.reg.Ranges(m.ctx, ref, desc)
		if err == nil {
			j.rec, err = lazy.ReadTOC(blobReaderAt{ctx: m.ctx, b: blob}, desc, tocDigest)
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
// then reads it itself, and meets the failure with its own context.
func (m *Manager) claimTOC(ctx context.Context, d digest.Digest) *lazy.Recorded {
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
		return nil
	}
	select {
	case <-j.done:
	case <-ctx.Done():
		return nil
	}
	if j.err != nil {
		log.G(ctx).WithError(j.err).WithField("layer", d).Debug("reading the TOC ahead failed")
		return nil
	}
	return j.rec
}

// lazyOptions are the options of the lazy layer in snapshot directory dir.
func (m *Manager) lazyOptions(dir string) lazy.Options {
	o := m.cfg.Lazy
	o.BlobPath = filepath.Join(dir, lazyBlobFile)
	return o
}

// mount serves ll at dir/lazy and starts its population.
func (m *Manager) mount(ctx context.Context, dir string, ll *lazyLayer) error {
	mp := filepath.Join(dir, lazyMount)
	if err := ll.layer.Mount(ctx, mp); err != nil {
		ll.layer.Close()
		return err
	}
	ll.state.Store(stateLazy)
	popCtx, cancel := context.WithCancel(m.ctx)
	ll.cancel = cancel
	m.mu.Lock()
	m.lazy[dir] = ll
	m.mu.Unlock()
	m.wg.Add(1)
	go m.populate(popCtx, dir, ll)
	return nil
}

// Restore implements snapshot.FileSystem: it mounts the lazy layer of dir
// again from the TOC saved there. The registry is needed only for reads of
// chunks that are not cached.
func (m *Manager) Restore(ctx context.Context, dir string, _ map[string]string) error {
	if m.cfg.Lazy.Cache == nil {
		return errors.New("lazy layers are disabled")
	}
	b, err := os.ReadFile(filepath.Join(dir, lazyDescFile))
	if err != nil {
		return err
	}
	var saved savedLayer
	if err := json.Unmarshal(b, &saved); err != nil {
		return fmt.Errorf("%s: %w", lazyDescFile, err)
	}
	tocDigest, ok := lazy.Capable(saved.Descriptor)
	if !ok {
		return fmt.Errorf("%s: not a lazy layer", lazyDescFile)
	}
	rec, err := lazy.LoadRecorded(filepath.Join(dir, lazyTOCFile))
	if err != nil {
		return err
	}
	blob, err := m.reg.Ranges(ctx, saved.Ref, saved.Descriptor)
	if err != nil {
		return err
	}
	l, err := lazy.Open(ctx, rec, blob, saved.Descriptor, tocDigest, m.lazyOptions(dir))
	if err != nil {
		return err
	}
	// A mount left by a daemon that died answers nothing (ENOTCONN).
	mp := filepath.Join(dir, lazyMount)
	if err := detach(mp); err != nil {
		return err
	}
	return m.mount(ctx, dir, &lazyLayer{ref: saved.Ref, desc: saved.Descriptor, layer: l})
}

// Release implements snapshot.FileSystem: it detaches the lazy mount of
// dir. Overlays still using it keep it until they are unmounted.
func (m *Manager) Release(ctx context.Context, dir string) error {
	m.mu.Lock()
	ll, ok := m.lazy[dir]
	delete(m.lazy, dir)
	m.mu.Unlock()
	if !ok {
		return detach(filepath.Join(dir, lazyMount))
	}
	ll.cancel()
	ll.layer.Close()
	done, err := ll.layer.Unmount()
	if err != nil {
		return err
	}
	go func() {
		<-done
		log.G(ctx).WithField("layer", ll.desc.Digest).Debug("lazy layer's FUSE server stopped")
	}()
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
