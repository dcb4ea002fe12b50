package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// State is how a committed layer that the snapshotter obtained itself is
// held. It is the value of the LabelState label.
type State string

const (
	// StateLocal: snapshots/<id>/fs holds the complete, verified tree.
	StateLocal State = "local"
	// StateLazy: the layer is served from its FileSystem mount at
	// snapshots/<id>/lazy while its content is fetched on demand.
	StateLazy State = "lazy"
)

// Labels the snapshotter writes on the snapshots it commits for remote
// layers.
const (
	// LabelState records the layer's State.
	LabelState = "lazylayer.io/state"
	// LabelLayerDigest records the blob digest a remote layer came from.
	LabelLayerDigest = "lazylayer.io/layer-digest"
)

// Labels of containerd's remote-snapshot protocol (pkg/snapshotters).
const (
	labelTargetRef       = snapshotters.TargetRefLabel
	labelTargetLayer     = snapshotters.TargetLayerDigestLabel
	labelTargetManifest  = snapshotters.TargetManifestDigestLabel
	labelTargetSnapshot  = snapshots.LabelSnapshotRef
	remoteLabelsRequired = 3
)

// FileSystem provides the content of remote layers.
//
// Prepare makes the layer described by labels (the labels containerd passed
// to Prepare: image reference, manifest and layer digests, ...) available in
// the snapshot directory dir:
//
//   - it fills dir/fs, which exists and is empty, with the complete,
//     verified tree of the layer and returns a nil LazyLayer; or
//   - it mounts the layer read-only at dir/lazy, which exists, serves its
//     content on demand, and returns the LazyLayer.
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
// Restore mounts a committed lazy layer at dir/lazy again when the
// snapshotter starts; labels are those it was committed with. If it
// fails, the snapshotter obtains the layer again with Prepare.
//
// Release stops serving the layer of dir, if it has a mount, before its
// snapshot is removed (or when its commit failed); overlays still using the
// mount keep working until they are unmounted. It also detaches a mount
// left at dir/lazy by an earlier daemon.
type FileSystem interface {
	Prepare(ctx context.Context, dir string, parents []string, labels map[string]string) (LazyLayer, error)
	Restore(ctx context.Context, dir string, labels map[string]string) (LazyLayer, error)
	Release(ctx context.Context, dir string) error
}

// LazyLayer is a layer a FileSystem serves lazily.
//
// The snapshotter calls Start once, when the layer's snapshot is committed
// (or restored): from then on the FileSystem may turn the layer local. When
// dir/fs holds the complete, verified tree it calls local, which records
// the layer local in the metastore; mounts handed out afterwards use dir/fs.
// If local returns an error the layer stays lazy and the FileSystem may
// call it again later.
type LazyLayer interface {
	Start(local func(context.Context) error)
}

// heldLayer is a committed remote layer that is not local (yet).
type heldLayer struct {
	name string
	// ready is nil while the layer is served at its lazy mount. It is set
	// when the layer could not be mounted again after a restart and is
	// being obtained again: mounts that need it wait for ready to close.
	ready chan struct{}
	why   error // why the layer is unavailable, with ready
}

// Prepare creates an active snapshot. When the labels name a remote layer
// (containerd.io/snapshot.ref and the cri.* labels) and the snapshotter has a
// FileSystem, it obtains the layer itself, commits it under the target name
// and returns an error wrapping errdefs.ErrAlreadyExists; if that fails for
// any reason but bad data it returns the mounts of the active snapshot, so
// containerd unpacks the layer the usual way. Concurrent Prepares of one
// target obtain the layer once: the later ones wait for the first.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	target, ok := remoteTarget(base.Labels)
	if !ok || s.fs == nil {
		mounts, _, err := s.createSnapshot(ctx, snapshots.KindActive, key, parent, opts, true)
		return mounts, err
	}
	done, err := s.claimTarget(ctx, target)
	if err != nil {
		return nil, err
	}
	defer done()
	if _, err := s.Stat(ctx, target); err == nil {
		return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	}
	_, snap, err := s.createSnapshot(ctx, snapshots.KindActive, key, parent, opts, false)
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
		if s.fellBack != nil {
			s.fellBack(err)
		}
		if err := resetDir(s.upperPath(snap.ID)); err != nil {
			return nil, fmt.Errorf("reset snapshot %q for fallback: %w", key, err)
		}
		return s.mountsOf(ctx, key, snap)
	}
}

// claimTarget makes the caller the only Prepare obtaining target, waiting
// for another one under way. done must be called when the caller is
// finished.
func (s *Snapshotter) claimTarget(ctx context.Context, target string) (done func(), err error) {
	for {
		s.mu.Lock()
		busy, ok := s.preparing[target]
		if !ok {
			ch := make(chan struct{})
			s.preparing[target] = ch
			s.mu.Unlock()
			return func() {
				s.mu.Lock()
				delete(s.preparing, target)
				s.mu.Unlock()
				close(ch)
			}, nil
		}
		s.mu.Unlock()
		select {
		case <-busy:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// fetchRemote fills the active snapshot key with the remote layer and commits
// it as target. A lazy layer's population starts only once it is committed.
func (s *Snapshotter) fetchRemote(ctx context.Context, key, target string, snap storage.Snapshot, labels map[string]string) error {
	parents, err := s.lowerPaths(ctx, snap.ParentIDs)
	if err != nil {
		return err
	}
	dir := s.snapshotDir(snap.ID)
	if err := os.Mkdir(s.lazyPath(snap.ID), 0o755); err != nil {
		return err
	}
	ll, err := s.fs.Prepare(ctx, dir, parents, labels)
	if err != nil {
		return err
	}
	state := StateLocal
	if ll != nil {
		state = StateLazy
		// Known before the commit, so that no child of the committed
		// snapshot ever gets its empty fs/ as a lower directory.
		s.mu.Lock()
		s.held[snap.ID] = &heldLayer{name: target}
		s.mu.Unlock()
	}
	commitLabels := map[string]string{}
	for k, v := range labels {
		commitLabels[k] = v
	}
	commitLabels[LabelState] = string(state)
	commitLabels[LabelLayerDigest] = labels[labelTargetLayer]
	err = s.Commit(ctx, target, key, snapshots.WithLabels(commitLabels))
	if err != nil && errdefs.IsAlreadyExists(err) {
		// Another pull of the same chain committed first.
		if rerr := s.Remove(ctx, key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("remove duplicate layer snapshot")
		}
		return nil
	}
	if err != nil {
		if rerr := s.release(ctx, snap.ID); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("release layer whose commit failed")
		}
		return fmt.Errorf("commit layer as %q: %w", target, err)
	}
	if ll != nil {
		ll.Start(s.localFunc(snap.ID, target))
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

// localFunc is the call that records the lazy layer of snapshot id (named
// name) local; the FileSystem makes it once dir/fs holds the whole tree.
func (s *Snapshotter) localFunc(id, name string) func(context.Context) error {
	return func(ctx context.Context) error {
		err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			got, info, _, err := storage.GetInfo(ctx, name)
			if err != nil {
				return err
			}
			if got != id {
				return fmt.Errorf("snapshot %q is no longer snapshot %s: %w", name, id, errdefs.ErrNotFound)
			}
			info.Labels[LabelState] = string(StateLocal)
			_, err = storage.UpdateInfo(ctx, info, "labels."+LabelState)
			return err
		})
		if err != nil {
			return fmt.Errorf("mark layer %s local: %w", name, err)
		}
		s.mu.Lock()
		h := s.held[id]
		delete(s.held, id)
		s.mu.Unlock()
		if h != nil && h.ready != nil {
			close(h.ready)
		}
		return nil
	}
}

// lowerPaths returns the directories the committed layers ids contribute to
// an overlay as plain lower layers: the FUSE mount of a lazy layer, the tree
// of a local one. For a layer being obtained again after a restart it
// waits until it is back.
func (s *Snapshotter) lowerPaths(ctx context.Context, ids []string) ([]string, error) {
	ls, err := s.lowers(ctx, ids, false)
	if err != nil {
		return nil, err
	}
	paths := make([]string, len(ls))
	for i, l := range ls {
		paths[i] = l.p.Lower
	}
	return paths, nil
}

// lowers returns how the committed layers ids are shown to overlay,
// waiting for layers that are being obtained again (see lowerPaths) and,
// when settled is true, for lazy layers to be presented as they stay
// (NativeFileSystem.WaitPresent): what a mount needs.
func (s *Snapshotter) lowers(ctx context.Context, ids []string, settled bool) ([]lower, error) {
	ls := make([]lower, len(ids))
	for i, id := range ids {
		for {
			s.mu.Lock()
			h := s.held[id]
			s.mu.Unlock()
			if h == nil || h.ready == nil {
				if nfs, ok := s.fs.(NativeFileSystem); ok && h != nil && settled {
					if err := nfs.WaitPresent(ctx, s.snapshotDir(id)); err != nil {
						return nil, err
					}
				}
				ls[i] = s.present(id, h != nil)
				break
			}
			log.G(ctx).WithField("layer", h.name).Info("waiting for a layer that is being fetched again")
			select {
			case <-h.ready:
			case <-ctx.Done():
				return nil, fmt.Errorf("layer %s is unavailable (%w) and is being fetched again: %w", h.name, h.why, ctx.Err())
			}
		}
	}
	return ls, nil
}

// present says how the committed layer id, lazy or not, is shown.
func (s *Snapshotter) present(id string, lazy bool) lower {
	l := lower{id: id, lazy: lazy}
	if nfs, ok := s.fs.(NativeFileSystem); ok {
		l.p = nfs.Present(s.snapshotDir(id), lazy)
		return l
	}
	l.p.Lower = s.upperPath(id)
	if lazy {
		l.p.Lower = s.lazyPath(id)
	}
	return l
}

func (s *Snapshotter) lazyPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "lazy")
}

// release stops serving snapshot id's lazy layer, if it has or had one,
// and makes sure nothing stays mounted under its directory.
func (s *Snapshotter) release(ctx context.Context, id string) error {
	s.mu.Lock()
	h := s.held[id]
	delete(s.held, id)
	s.mu.Unlock()
	if h != nil && h.ready != nil {
		close(h.ready) // stops its recovery; nobody can mount it any more
	}
	// A layer that turned local may still have a FUSE mount serving
	// running containers: release it either way.
	if s.fs != nil {
		if err := s.fs.Release(ctx, s.snapshotDir(id)); err != nil {
			return err
		}
	}
	return unmountUnder(s.snapshotDir(id))
}

// restoreLayers serves the committed remote layers again after a start: a
// lazy layer is mounted again, or obtained again in the background when
// that fails; a local layer's FUSE mount left by a daemon that died is
// detached. The snapshotter serves everything else whatever fails here.
func (s *Snapshotter) restoreLayers(ctx context.Context) error {
	type remoteLayer struct {
		id, name string
		labels   map[string]string
	}
	var layers []remoteLayer
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind != snapshots.KindCommitted || info.Labels[LabelLayerDigest] == "" {
				return nil
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			layers = append(layers, remoteLayer{id: id, name: info.Name, labels: info.Labels})
			return nil
		})
	})
	if err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("find remote layers: %w", err)
	}
	for _, l := range layers {
		dir := s.snapshotDir(l.id)
		lg := log.G(ctx).WithField("layer", l.labels[LabelLayerDigest])
		if State(l.labels[LabelState]) != StateLazy {
			if s.fs != nil {
				if err := s.fs.Release(ctx, dir); err != nil {
					lg.WithError(err).Warn("cannot detach the FUSE mount of a local layer left by the last daemon")
				}
			}
			continue
		}
		if s.fs == nil {
			s.unavailable(ctx, l.id, l.name, l.labels, errors.New("the snapshotter has no file system for remote layers"))
			continue
		}
		ll, err := s.fs.Restore(ctx, dir, l.labels)
		if err != nil {
			s.unavailable(ctx, l.id, l.name, l.labels, err)
			continue
		}
		s.mu.Lock()
		s.held[l.id] = &heldLayer{name: l.name}
		s.mu.Unlock()
		ll.Start(s.localFunc(l.id, l.name))
	}
	return nil
}

// unavailable records that the lazy layer of snapshot id cannot be served
// as it was and obtains it again in the background with Prepare; mounts
// that need it wait until then.
func (s *Snapshotter) unavailable(ctx context.Context, id, name string, labels map[string]string, why error) {
	log.G(ctx).WithError(why).WithField("layer", labels[LabelLayerDigest]).
		Warn("cannot serve a lazy layer again; fetching it again, containers that need it wait")
	h := &heldLayer{name: name, ready: make(chan struct{}), why: why}
	s.mu.Lock()
	s.held[id] = h
	s.mu.Unlock()
	if s.fs == nil {
		return
	}
	s.wg.Add(1)
	go s.recover(id, h, labels)
}

// recover obtains the layer h of snapshot id again until it succeeds, the
// snapshot is removed or the snapshotter closes.
func (s *Snapshotter) recover(id string, h *heldLayer, labels map[string]string) {
	defer s.wg.Done()
	ctx := log.WithLogger(s.bg, log.G(s.bg).WithField("layer", labels[LabelLayerDigest]))
	local := s.localFunc(id, h.name)
	for backoff := time.Second; ; backoff = min(2*backoff, 5*time.Minute) {
		err := resetDir(s.upperPath(id))
		var ll LazyLayer
		if err == nil {
			// The parents only lend attributes to directories a layer
			// does not list; a recovered layer goes without them.
			ll, err = s.fs.Prepare(ctx, s.snapshotDir(id), nil, labels)
		}
		if err == nil && ll == nil {
			err = local(ctx)
		}
		if err == nil && ll != nil {
			s.mu.Lock()
			current := s.held[id] == h
			if current {
				s.held[id] = &heldLayer{name: h.name}
			}
			s.mu.Unlock()
			if !current { // released meanwhile
				if err := s.fs.Release(ctx, s.snapshotDir(id)); err != nil {
					log.G(ctx).WithError(err).Warn("release a layer obtained again after its snapshot was removed")
				}
				return
			}
			close(h.ready)
			ll.Start(local)
		}
		if err == nil {
			log.G(ctx).Info("layer obtained again")
			return
		}
		log.G(ctx).WithError(err).WithField("retry", backoff).Warn("cannot obtain the layer again")
		select {
		case <-time.After(backoff):
		case <-h.ready: // released
			return
		case <-ctx.Done():
			return
		}
	}
}

// mountsOf returns the mounts of the active snapshot key (snap), removing
// it if they cannot be had.
func (s *Snapshotter) mountsOf(ctx context.Context, key string, snap storage.Snapshot) ([]mount.Mount, error) {
	mounts, err := s.mounts(ctx, snap, snapshots.Info{})
	if err != nil {
		if rerr := s.Remove(context.WithoutCancel(ctx), key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("remove snapshot whose mounts failed")
		}
		return nil, err
	}
	return mounts, nil
}
