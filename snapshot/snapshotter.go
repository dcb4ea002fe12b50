package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Labels the snapshotter reads from Prepare and writes on the snapshots it
// commits for remote layers.
const (
	// LabelState records how a committed layer is held. "local" means
	// snapshots/<id>/fs is complete and verified.
	LabelState = "lazylayer.io/state"
	// LabelLayerDigest records the blob digest a remote layer came from.
	LabelLayerDigest = "lazylayer.io/layer-digest"

	// StateLocal is the LabelState value of a complete local layer tree.
	StateLocal = "local"
	// StateLazy is the LabelState value of a layer served from
	// snapshots/<id>/lazy while its content is fetched on demand.
	StateLazy = "lazy"
)

// Labels of containerd's remote-snapshot protocol (pkg/snapshotters).
const (
	labelTargetRef       = "containerd.io/snapshot/cri.image-ref"
	labelTargetLayer     = "containerd.io/snapshot/cri.layer-digest"
	labelTargetManifest  = "containerd.io/snapshot/cri.manifest-digest"
	labelTargetSnapshot  = snapshots.LabelSnapshotRef
	remoteLabelsRequired = 3
)

// FileSystem provides the content of remote layers.
//
// Prepare makes the layer described by labels (the labels containerd passed
// to Prepare: image reference, manifest and layer digests, ...) available in
// the snapshot directory dir, and reports how:
//
//   - StateLocal: dir/fs, which exists and is empty, now holds the complete,
//     verified tree of the layer;
//   - StateLazy: the layer is mounted read-only at dir/lazy, which exists,
//     and its content is fetched on demand.
//
// parents lists the directories of the layers below, topmost first;
// directories the layer creates implicitly inherit their attributes from
// them, as containerd's own applier does. On error dir/fs may hold partial
// content, which the caller discards, and nothing is mounted.
//
// Prepare returns an error for which errdefs.IsDataLoss is true when the
// registry's data was wrong (digest mismatch, corrupt or malicious archive):
// such a layer must not be used. Any other error means the layer could not be
// obtained (registry down, no credentials, disk full): the snapshotter then
// lets containerd pull the layer itself.
//
// Restore mounts a lazy layer at dir/lazy again when the snapshotter starts.
// Release stops serving a lazy layer before its snapshot is removed; overlays
// still using it keep working until they are unmounted.
type FileSystem interface {
	Prepare(ctx context.Context, dir string, parents []string, labels map[string]string) (state string, err error)
	Restore(ctx context.Context, dir string, labels map[string]string) error
	Release(ctx context.Context, dir string) error
}

// Snapshotter is a containerd snapshots.Snapshotter over overlayfs that can
// obtain image layers itself through a FileSystem. See the package doc.
type Snapshotter struct {
	root    string
	ms      *storage.MetaStore
	fs      FileSystem // nil: a plain overlay snapshotter
	options []string   // extra overlay mount options

	mu   sync.Mutex
	lazy map[string]string // id → name of committed lazy layers; guarded by mu
}

// Opt configures a Snapshotter.
type Opt func(*Snapshotter)

// WithFileSystem makes Prepare obtain remote layers from f.
func WithFileSystem(f FileSystem) Opt {
	return func(s *Snapshotter) { s.fs = f }
}

// New opens (or creates) a snapshotter rooted at root: metadata.db and
// snapshots/ live there. Snapshot directories that the metastore does not know
// (left by a crash between a transaction and its directory work) are removed.
func New(ctx context.Context, root string, opts ...Opt) (*Snapshotter, error) {
	if err := os.MkdirAll(filepath.Join(root, "snapshots"), 0o700); err != nil {
		return nil, err
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		return nil, fmt.Errorf("open metastore: %w", err)
	}
	s := &Snapshotter{root: root, ms: ms, lazy: map[string]string{}}
	if _, err := os.Stat("/sys/module/overlay/parameters/index"); err == nil {
		s.options = append(s.options, "index=off")
	}
	for _, o := range opts {
		o(s)
	}
	if err := s.Cleanup(ctx); err != nil {
		ms.Close()
		return nil, err
	}
	if err := s.restoreLazy(ctx); err != nil {
		ms.Close()
		return nil, err
	}
	return s, nil
}

// restoreLazy finds the committed lazy layers and mounts them again. A
// layer that cannot be mounted is logged: the snapshotter still serves
// everything else.
func (s *Snapshotter) restoreLazy(ctx context.Context) error {
	type lazyLayer struct {
		id, name string
		labels   map[string]string
	}
	var layers []lazyLayer
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind != snapshots.KindCommitted || info.Labels[LabelState] != StateLazy {
				return nil
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			layers = append(layers, lazyLayer{id: id, name: info.Name, labels: info.Labels})
			return nil
		})
	})
	if err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("find lazy layers: %w", err)
	}
	for _, l := range layers {
		s.mu.Lock()
		s.lazy[l.id] = l.name
		s.mu.Unlock()
		if s.fs == nil {
			continue
		}
		if err := s.fs.Restore(ctx, s.snapshotDir(l.id), l.labels); err != nil {
			log.G(ctx).WithError(err).WithField("layer", l.labels[LabelLayerDigest]).Error("cannot mount lazy layer again")
		}
	}
	return nil
}

// Stat returns the info of the snapshot key.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update updates the mutable fields (labels) of a snapshot.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (newInfo snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		newInfo, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	return newInfo, err
}

// Usage returns the disk usage of a snapshot: recorded at commit for
// committed snapshots, measured now for active ones.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil {
			return snapshots.Usage{}, err
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Prepare creates an active snapshot. When the labels name a remote layer
// (containerd.io/snapshot.ref and the cri.* labels) and the snapshotter has a
// FileSystem, it obtains the layer itself, commits it under the target name
// and returns an error wrapping errdefs.ErrAlreadyExists; if that fails for
// any reason but bad data it returns the mounts of the active snapshot, so
// containerd unpacks the layer the usual way.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	target, ok := remoteTarget(base.Labels)
	if !ok || s.fs == nil {
		mounts, _, err := s.createSnapshot(ctx, snapshots.KindActive, key, parent, opts)
		return mounts, err
	}
	if _, err := s.Stat(ctx, target); err == nil {
		return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	}
	mounts, snap, err := s.createSnapshot(ctx, snapshots.KindActive, key, parent, opts)
	if err != nil {
		return nil, err
	}
	err = s.fetchRemote(ctx, key, target, snap, base.Labels)
	switch {
	case err == nil:
		return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	case errdefs.IsDataLoss(err):
		if rerr := s.Remove(ctx, key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("remove snapshot of rejected layer")
		}
		return nil, fmt.Errorf("lazylayer rejected the layer: %w", err)
	case ctx.Err() != nil:
		if rerr := s.Remove(context.WithoutCancel(ctx), key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("remove snapshot of cancelled fetch")
		}
		return nil, err
	default:
		log.G(ctx).WithError(err).WithField("layer", base.Labels[labelTargetLayer]).
			Warn("cannot fetch layer; containerd will pull and unpack it instead")
		upper := s.upperPath(snap.ID)
		if err := resetDir(upper); err != nil {
			return nil, fmt.Errorf("reset snapshot %q for fallback: %w", key, err)
		}
		return mounts, nil
	}
}

// fetchRemote fills the active snapshot key with the remote layer and commits
// it as target.
func (s *Snapshotter) fetchRemote(ctx context.Context, key, target string, snap storage.Snapshot, labels map[string]string) error {
	parents := make([]string, len(snap.ParentIDs))
	for i, id := range snap.ParentIDs {
		parents[i] = s.lowerPath(id)
	}
	dir := s.snapshotDir(snap.ID)
	if err := os.Mkdir(s.lazyPath(snap.ID), 0o755); err != nil {
		return err
	}
	state, err := s.fs.Prepare(ctx, dir, parents, labels)
	if err != nil {
		return err
	}
	commitLabels := map[string]string{
		LabelState:       state,
		LabelLayerDigest: labels[labelTargetLayer],
	}
	for k, v := range labels {
		commitLabels[k] = v
	}
	if state == StateLazy {
		s.mu.Lock()
		s.lazy[snap.ID] = target
		s.mu.Unlock()
	}
	err = s.Commit(ctx, target, key, snapshots.WithLabels(commitLabels))
	if err != nil && errdefs.IsAlreadyExists(err) {
		// Another pull of the same chain committed first.
		if rerr := s.Remove(ctx, key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("remove duplicate layer snapshot")
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("commit layer as %q: %w", target, err)
	}
	return nil
}

// remoteTarget reports the target snapshot name when labels carry everything
// the remote-snapshot protocol needs.
func remoteTarget(labels map[string]string) (string, bool) {
	target := labels[labelTargetSnapshot]
	if target == "" {
		return "", false
	}
	n := 0
	for _, k := range []string{labelTargetRef, labelTargetLayer, labelTargetManifest} {
		if labels[k] != "" {
			n++
		}
	}
	return target, n == remoteLabelsRequired
}

// View creates a read-only view of parent.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	mounts, _, err := s.createSnapshot(ctx, snapshots.KindView, key, parent, opts)
	return mounts, err
}

// Mounts returns the mounts of an active or view snapshot.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var (
		snap storage.Snapshot
		info snapshots.Info
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		snap, err = storage.GetSnapshot(ctx, key)
		if err != nil {
			return fmt.Errorf("get active mount: %w", err)
		}
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return nil, err
	}
	return s.mounts(snap, info), nil
}

// Commit turns the active snapshot key into the committed snapshot name.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	var id string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return err
	}
	// Measure outside the transaction: it walks the whole tree.
	du, err := fs.DiskUsage(ctx, s.upperPath(id))
	if err != nil {
		return fmt.Errorf("measure snapshot %q: %w", key, err)
	}
	return s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, name, snapshots.Usage(du), opts...)
		if err != nil {
			return fmt.Errorf("commit snapshot %q: %w", key, err)
		}
		return nil
	})
}

// Remove deletes a snapshot. Its directory is deleted after the metastore
// transaction committed; a crash in between leaves a directory that the next
// Cleanup removes.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var id string
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		id, _, err = storage.Remove(ctx, key)
		if err != nil {
			return fmt.Errorf("remove snapshot %q: %w", key, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := s.release(ctx, id); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("release lazy layer; Cleanup will retry")
		return nil
	}
	if err := os.RemoveAll(s.snapshotDir(id)); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("remove snapshot directory; Cleanup will retry")
	}
	return nil
}

// Walk calls fn for every snapshot matching the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup removes snapshot directories the metastore does not know.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	var known map[string]string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		known, err = storage.IDMap(ctx)
		if errdefs.IsNotFound(err) { // a new metastore has no buckets yet
			return nil
		}
		return err
	})
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
	if err != nil {
		return err
	}
	for _, e := range entries {
		if _, ok := known[e.Name()]; ok {
			continue
		}
		dir := filepath.Join(s.root, "snapshots", e.Name())
		if err := unmountUnder(dir); err != nil {
			return fmt.Errorf("cleanup %s: %w", dir, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("cleanup %s: %w", dir, err)
		}
		log.G(ctx).WithField("dir", dir).Debug("removed orphaned snapshot directory")
	}
	return nil
}

// Close releases the metastore.
func (s *Snapshotter) Close() error {
	return s.ms.Close()
}

// createSnapshot builds the directories of a new snapshot in a temporary
// place and renames them into snapshots/<id> inside the metastore transaction
// that creates the snapshot.
func (s *Snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, snap storage.Snapshot, err error) {
	snapshotsDir := filepath.Join(s.root, "snapshots")
	td, err := os.MkdirTemp(snapshotsDir, "new-")
	if err != nil {
		return nil, snap, fmt.Errorf("create temporary snapshot directory: %w", err)
	}
	defer func() {
		if td != "" {
			if rerr := os.RemoveAll(td); rerr != nil {
				log.G(ctx).WithError(rerr).Warn("remove temporary snapshot directory")
			}
		}
	}()
	if err := os.Mkdir(filepath.Join(td, "fs"), 0o755); err != nil {
		return nil, snap, err
	}
	if kind == snapshots.KindActive {
		if err := os.Mkdir(filepath.Join(td, "work"), 0o711); err != nil {
			return nil, snap, err
		}
	}

	var info snapshots.Info
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return fmt.Errorf("create snapshot: %w", err)
		}
		_, info, _, err = storage.GetInfo(ctx, key)
		if err != nil {
			return fmt.Errorf("get snapshot info: %w", err)
		}
		if len(snap.ParentIDs) > 0 {
			// The new upper directory takes the owner of the parent's root,
			// as containerd's overlay snapshotter does.
			st, err := os.Stat(s.upperPath(snap.ParentIDs[0]))
			if err != nil {
				return fmt.Errorf("stat parent: %w", err)
			}
			if err := chownLike(filepath.Join(td, "fs"), st); err != nil {
				return err
			}
		}
		if err := os.Rename(td, s.snapshotDir(snap.ID)); err != nil {
			return fmt.Errorf("rename snapshot directory: %w", err)
		}
		td = ""
		return nil
	})
	if err != nil {
		return nil, snap, err
	}
	return s.mounts(snap, info), snap, nil
}

// mounts returns the mounts for snap: a bind mount when there is a single
// directory to show, an overlay otherwise.
func (s *Snapshotter) mounts(snap storage.Snapshot, _ snapshots.Info) []mount.Mount {
	if len(snap.ParentIDs) == 0 {
		ro := "rw"
		if snap.Kind == snapshots.KindView {
			ro = "ro"
		}
		return []mount.Mount{{Type: "bind", Source: s.upperPath(snap.ID), Options: []string{ro, "rbind"}}}
	}
	var options []string
	if snap.Kind == snapshots.KindActive {
		options = append(options,
			"workdir="+s.workPath(snap.ID),
			"upperdir="+s.upperPath(snap.ID),
		)
	} else if len(snap.ParentIDs) == 1 {
		return []mount.Mount{{Type: "bind", Source: s.lowerPath(snap.ParentIDs[0]), Options: []string{"ro", "rbind"}}}
	}
	lowers := make([]string, len(snap.ParentIDs))
	for i, id := range snap.ParentIDs {
		lowers[i] = s.lowerPath(id)
	}
	options = append(options, "lowerdir="+strings.Join(lowers, ":"))
	options = append(options, s.options...)
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: options}}
}

func (s *Snapshotter) snapshotDir(id string) string {
	return filepath.Join(s.root, "snapshots", id)
}

func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "fs")
}

// lowerPath is the directory a committed layer contributes to an overlay:
// its FUSE mount while it is lazy, its tree once it is local.
func (s *Snapshotter) lowerPath(id string) string {
	s.mu.Lock()
	_, lazy := s.lazy[id]
	s.mu.Unlock()
	if lazy {
		return s.lazyPath(id)
	}
	return s.upperPath(id)
}

// MarkLocal records that the lazy layer in snapshot directory dir is now
// complete and verified in dir/fs: the mounts handed out from now on use
// dir/fs instead of the FUSE mount. The FileSystem calls it once it has
// moved the complete tree into place.
func (s *Snapshotter) MarkLocal(ctx context.Context, dir string) error {
	id := filepath.Base(dir)
	if s.snapshotDir(id) != filepath.Clean(dir) {
		return fmt.Errorf("%s is not a snapshot directory of %s", dir, s.root)
	}
	s.mu.Lock()
	name, ok := s.lazy[id]
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("snapshot %s has no lazy layer", id)
	}
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, name)
		if err != nil {
			return err
		}
		info.Labels[LabelState] = StateLocal
		_, err = storage.UpdateInfo(ctx, info, "labels."+LabelState)
		return err
	})
	if err != nil {
		return fmt.Errorf("mark layer %s local: %w", name, err)
	}
	s.mu.Lock()
	delete(s.lazy, id)
	s.mu.Unlock()
	return nil
}

func (s *Snapshotter) lazyPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "lazy")
}

// release stops serving snapshot id's lazy layer, if it has or had one,
// and makes sure nothing stays mounted under its directory.
func (s *Snapshotter) release(ctx context.Context, id string) error {
	s.mu.Lock()
	delete(s.lazy, id)
	s.mu.Unlock()
	// A layer that turned local may still have a FUSE mount serving
	// running containers: release it either way.
	if s.fs != nil {
		if err := s.fs.Release(ctx, s.snapshotDir(id)); err != nil {
			return err
		}
	}
	return unmountUnder(s.snapshotDir(id))
}

func (s *Snapshotter) workPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "work")
}

// resetDir empties dir, keeping the directory itself and its attributes.
func resetDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
	}
	return errors.Join(errs...)
}
