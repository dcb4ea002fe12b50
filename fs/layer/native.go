package layer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"

	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/fs/meta"
)

// Native metadata (see docs/native-metadata.md): a lazy layer in snapshot
// directory dir is shown to overlay as its metadata tree dir/meta, whose
// regular files redirect to /.lazylayer/<id>/<path>, followed by two
// data-only layers: the shared data directory (Config.DataDir), where
// population links each file once verified, and the layer's FUSE mount,
// whose root holds .lazylayer/<id>/ and serves what is not local yet. Once
// the whole blob is verified, DataDir/.lazylayer/<id> holds the layer's
// complete tree, and dir/fs becomes a symbolic link to it.

const metaDir = "meta" // the metadata tree, in the snapshot directory

// Presentation is how a layer is shown to overlay.
type Presentation struct {
	Lower string   // the directory to use as a plain lower layer
	Meta  string   // the metadata tree; "" when the layer has none
	Data  []string // the data-only layers Meta's redirects need, in order
}

// layerID is the name a layer's redirects and data go under: its snapshot
// id, the base name of its snapshot directory.
func layerID(dir string) string { return filepath.Base(dir) }

// redirectRoot is where the redirects of the layer of dir point.
func redirectRoot(dir string) string { return "/" + meta.RedirectRoot + "/" + layerID(dir) }

// placeDir is where population links the layer's verified files.
func (m *Manager) placeDir(dir string) string {
	return filepath.Join(m.cfg.DataDir, meta.RedirectRoot, layerID(dir))
}

// containerStart is how long after a container was handed a lazy layer's
// mounts population waits for its first reads (see lazy.Activity.Hold).
const containerStart = time.Second

// Present implements snapshot.NativeFileSystem.
func (m *Manager) Present(dir string, lazyLayer bool) Presentation {
	m.mu.Lock()
	ll := m.lazy[dir]
	m.mu.Unlock()
	if lazyLayer {
		// A container is about to start on the layer: population
		// waits until it has started reading, and its reads have been
		// quiet for a while.
		m.cfg.Lazy.Activity.Hold(containerStart)
		p := Presentation{Lower: filepath.Join(dir, lazyMount)}
		if ll != nil && ll.native {
			// The data mount's subtree is the whole layer: what
			// containers see until its metadata tree is built, or if
			// it cannot be.
			p.Lower = filepath.Join(p.Lower, meta.RedirectRoot, layerID(dir))
			if ll.metaBuilt.Load() {
				p.Meta = filepath.Join(dir, metaDir)
				p.Data = []string{m.cfg.DataDir, filepath.Join(dir, lazyMount)}
			}
		}
		return p
	}
	p := Presentation{Lower: filepath.Join(dir, "fs")}
	if m.cfg.DataDir != "" {
		if st, err := os.Stat(filepath.Join(dir, metaDir)); err == nil && st.IsDir() {
			p.Meta = filepath.Join(dir, metaDir)
			p.Data = []string{m.cfg.DataDir}
		}
	}
	return p
}

// buildMeta builds the metadata tree of l in dir.
func (m *Manager) buildMeta(ctx context.Context, dir string, l *lazy.Layer) error {
	start := time.Now()
	md := filepath.Join(dir, metaDir)
	if st, err := os.Stat(md); err == nil && st.IsDir() {
		return nil // built before a restart
	}
	if err := meta.Build(ctx, md, l.MetaEntries(redirectRoot(dir))); err != nil {
		return err
	}
	log.G(ctx).WithFields(log.Fields{
		"layer": layerID(dir), "entries": l.Entries(), "elapsed": time.Since(start).Round(time.Millisecond),
	}).Debug("metadata tree written")
	return nil
}

// mountNative makes the data mount of l for native metadata; its metadata
// tree is built afterwards (finishNative). On error nothing is left.
func (m *Manager) mountNative(ctx context.Context, dir string, l *lazy.Layer, ph phases) error {
	// The place is known before the mount is served: a connection the
	// last daemon left gets at once the requests it left unanswered, and
	// an open of a file it served from the place must be served from
	// there again (it may share the inode's passthrough backing file with
	// opens not yet released, which refuse a page-cache open).
	if err := os.MkdirAll(m.placeDir(dir), 0o755); err != nil {
		return err
	}
	l.SetPlaced(m.placeDir(dir))
	start := time.Now()
	if err := l.MountData(ctx, filepath.Join(dir, lazyMount), meta.RedirectRoot+"/"+layerID(dir)); err != nil {
		l.SetPlaced("")
		return err
	}
	ph.since("datamount", start)
	return nil
}

// finishNative builds the metadata tree of ll, a layer with a data mount,
// and places the files containerd reads first, then closes ll.metaDone.
// It runs after the layer's Prepare returned: a pull need not wait for
// thousands of files to be created, and mounts of the layer wait for it
// (WaitPresent). If the tree cannot be built, containers see the layer
// through its data mount, whose subtree holds the whole layer; population
// still places its files, so the layer turns local all the same.
func (m *Manager) finishNative(ll *Lazy) {
	defer m.wg.Done()
	defer close(ll.metaDone)
	ctx := log.WithLogger(ll.ctx, log.G(ll.ctx).WithField("layer", ll.desc.Digest))
	start := time.Now()
	built := make(chan error, 1)
	go func() {
		weight := treeWeight(ll.layer.Entries())
		if err := m.building.Acquire(ctx, weight); err != nil {
			built <- err
			return
		}
		defer m.building.Release(weight)
		built <- m.buildMeta(ctx, ll.dir, ll.layer)
	}()
	// containerd reads these from the container's root before it starts
	// (users and groups of the process): local first, they are never
	// bound to FUSE. They are fetched while the tree is built, which
	// takes longer.
	placeErr := ll.layer.PlaceNow(ctx, m.cfg.Staging, earlyFiles...)
	placed := time.Since(start)
	err := <-built
	if ctx.Err() != nil {
		return // released or closing: nothing mounts the layer any more
	}
	if placeErr != nil {
		log.G(ctx).WithError(placeErr).Warn("cannot place the files containerd reads first; containers read them through FUSE")
	}
	if err != nil {
		os.RemoveAll(filepath.Join(ll.dir, metaDir))
		log.G(ctx).WithError(err).Warn("cannot build the layer's metadata tree; containers read its metadata through FUSE")
		// A daemon that takes over the layer's FUSE mount once it is
		// local needs to know the mount is a data mount (serveRetiring).
		if err := os.WriteFile(filepath.Join(ll.dir, noMetaFile), nil, 0o600); err != nil {
			log.G(ctx).WithError(err).Warn("cannot record that the layer has no metadata tree: a restarted daemon cannot serve its FUSE mount again once it is local")
		}
		return
	}
	ll.metaBuilt.Store(true)
	log.G(ctx).WithFields(log.Fields{
		"entries": ll.layer.Entries(), "place": placed.Round(time.Millisecond),
		"elapsed": time.Since(start).Round(time.Millisecond),
	}).Info("metadata tree built")
}

// treeEntriesAtOnce bounds the entries of the metadata trees built at
// once, which are in memory while they are (a tree of more is built
// alone). Python's two trees (6,672 and 1,609 entries) built together
// rather than one after the other were both done 0.52–0.56 s after the
// first layer's mount instead of 0.67–0.70 s (docs/benchmarks.md): a
// tree's directories are filled a level at a time, a directory by one
// worker, which leaves a core idle at times.
const treeEntriesAtOnce = 32 << 10

// treeWeight is what building a tree of n entries takes of
// Manager.building.
func treeWeight(n int) int64 { return int64(min(max(n, 1), treeEntriesAtOnce)) }

// WaitPresent implements snapshot.NativeFileSystem: it waits until the
// lazy layer of dir is shown to overlay as it stays while lazy: its
// metadata tree built (or given up) and the files containerd reads first
// placed.
func (m *Manager) WaitPresent(ctx context.Context, dir string) error {
	m.mu.Lock()
	ll := m.lazy[dir]
	m.mu.Unlock()
	if ll == nil {
		return nil
	}
	select {
	case <-ll.metaDone:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("metadata tree of layer %s: %w", ll.desc.Digest, ctx.Err())
	}
}

// earlyFiles are what containerd reads of an image's root itself.
var earlyFiles = []string{"etc/passwd", "etc/group"}

// linkTree makes dir/fs, an empty directory while the layer was lazy, a
// symbolic link to the layer's complete tree under the data directory.
func (m *Manager) linkTree(dir string) error {
	tree, place := filepath.Join(dir, "fs"), m.placeDir(dir)
	if target, err := os.Readlink(tree); err == nil && target == place {
		return nil
	}
	if err := emptyDir(tree); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(tree); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return os.Symlink(place, tree)
}

// Remove implements snapshot.NativeFileSystem: it deletes the layer's
// tree in the data directory and its metadata tree. The snapshot is gone
// and no overlay uses them.
func (m *Manager) Remove(dir string) error {
	if m.cfg.DataDir == "" {
		return nil
	}
	return errors.Join(os.RemoveAll(m.placeDir(dir)), os.RemoveAll(filepath.Join(dir, metaDir)))
}
