package layer

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"

	"github.com/lazylayer/lazylayer/fs/extract"
)

// statePopulating is reported while a lazy layer downloads in the
// background; the snapshot package only knows lazy and local.
const statePopulating = "populating"

// SetOnLocal sets what the Manager calls when a lazy layer's complete,
// verified tree is in dir/fs: the snapshotter's MarkLocal. Population
// starts only once it is set.
func (m *Manager) SetOnLocal(f func(ctx context.Context, dir string) error) {
	m.onLocalOnce.Do(func() {
		m.onLocal = f
		close(m.ready)
	})
}

// populate downloads ll in the background, verifies it and swaps it to a
// local tree: new containers then mount dir/fs, running ones read it
// through the FUSE mount (with passthrough where supported), and the FUSE
// mount retires once the last overlay using it is gone.
func (m *Manager) populate(ctx context.Context, dir string, ll *lazyLayer) {
	defer m.wg.Done()
	select {
	case <-m.ready:
	case <-ctx.Done():
		return
	}
	if m.cfg.PopulateDelay < 0 {
		return
	}
	select {
	case <-time.After(m.cfg.PopulateDelay):
	case <-ctx.Done():
		return
	}
	log := log.G(ctx).WithField("layer", ll.desc.Digest)
	backoff := time.Second
	for {
		ll.state.Store(statePopulating)
		err := m.populateOnce(ctx, dir, ll)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		ll.state.Store(stateLazy)
		if errors.Is(err, extract.ErrInvalid) {
			log.WithError(err).Error("layer failed verification after population; it stays lazy and is fetched again later")
		} else {
			log.WithError(err).Warn("population failed; retrying")
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(backoff*2, 5*time.Minute)
	}
	ll.state.Store(stateLocal)
	p := ll.layer.Progress()
	log.WithFields(map[string]any{
		"fetched": p.Fetched, "size": p.Size, "elapsed": p.Elapsed.Round(time.Millisecond),
	}).Info("layer is local")

	// Containers that were handed the FUSE mount just before the swap may
	// not have mounted their overlay yet: give them time before detaching.
	select {
	case <-time.After(m.cfg.SwapGrace):
	case <-ctx.Done():
	}
	m.retire(ctx, dir, ll)
}

// populateOnce downloads and verifies ll into a staging tree and moves it
// into dir/fs.
func (m *Manager) populateOnce(ctx context.Context, dir string, ll *lazyLayer) error {
	staging, err := os.MkdirTemp(m.cfg.Staging, "populate-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(staging)
	if err := os.Chmod(staging, 0o755); err != nil {
		return err
	}
	if err := ll.layer.Populate(ctx, staging, m.cfg.Populate); err != nil {
		return err
	}
	tree := filepath.Join(dir, "fs")
	// A daemon that died between moving a tree here and recording the
	// layer local left one: a lazy layer's fs/ is in no overlay, so it
	// can go.
	if err := emptyDir(tree); err != nil {
		return err
	}
	if err := moveTree(staging, tree); err != nil {
		return err
	}
	if err := m.onLocal(ctx, dir); err != nil {
		// The tree is complete; without the record new containers keep
		// the FUSE mount, which stays correct.
		return err
	}
	ll.layer.SetLocal(tree)
	if err := m.cfg.Lazy.Cache.Delete(ll.layer.Chunks()...); err != nil {
		log.G(ctx).WithError(err).WithField("layer", ll.desc.Digest).Warn("cannot delete the layer's cached chunks")
	}
	if err := ll.layer.DropBlob(); err != nil {
		log.G(ctx).WithError(err).WithField("layer", ll.desc.Digest).Warn("cannot delete the layer's blob copy")
	}
	for _, f := range []string{lazyTOCFile, lazyDescFile} {
		os.Remove(filepath.Join(dir, f))
	}
	return nil
}

// retire detaches a local layer's FUSE mount; its server answers the
// overlays still using it and stops when the last is unmounted.
func (m *Manager) retire(ctx context.Context, dir string, ll *lazyLayer) {
	done, err := ll.layer.Unmount()
	if err != nil {
		log.G(ctx).WithError(err).WithField("layer", ll.desc.Digest).Warn("cannot detach the FUSE mount of a local layer")
		return
	}
	// A stale lowerdir must fail loudly, not show an empty layer.
	os.Remove(filepath.Join(dir, lazyMount))
	log.G(ctx).WithField("layer", ll.desc.Digest).Info("FUSE mount detached; it retires when its last container stops")
	select {
	case <-done:
	case <-m.ctx.Done():
		return
	}
	m.mu.Lock()
	if m.lazy[dir] == ll {
		delete(m.lazy, dir)
	}
	m.mu.Unlock()
	log.G(ctx).WithField("layer", ll.desc.Digest).Info("FUSE mount retired")
}
