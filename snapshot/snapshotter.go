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

// Snapshotter is a containerd snapshots.Snapshotter over overlayfs that can
// obtain image layers itself through a FileSystem. See the package doc.
type Snapshotter struct {
	root string
	ms   *storage.MetaStore
	fs   FileSystem // nil: a plain overlay snapshotter
	// fellBack, if set, is told why each remote layer fell back to
	// containerd's pull.
	fellBack func(err error)
	options  []string   // extra overlay mount options
	mountMu  sync.Mutex // serializes native overlay mounts (native.go)

	mu        sync.Mutex
	held      map[string]*heldLayer    // committed layers not (yet) local, by id; guarded by mu
	preparing map[string]chan struct{} // remote targets being obtained; guarded by mu
	wg        sync.WaitGroup           // background recovery of unavailable layers
	stop      context.CancelFunc       // stops that recovery
	bg        context.Context
}

// Opt configures a Snapshotter.
type Opt func(*Snapshotter)

// WithFallbackObserver makes f learn of every remote layer that falls back
// to containerd's own pull, with the error that made it fall back. f must
// not block.
func WithFallbackObserver(f func(err error)) Opt {
	return func(s *Snapshotter) { s.fellBack = f }
}

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
	bg, stop := context.WithCancel(context.WithoutCancel(ctx))
	s := &Snapshotter{root: root, ms: ms, held: map[string]*heldLayer{}, preparing: map[string]chan struct{}{}, bg: bg, stop: stop}
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
	if err := s.restoreLayers(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
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

// View creates a read-only view of parent.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	mounts, _, err := s.createSnapshot(ctx, snapshots.KindView, key, parent, opts, true)
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
	return s.mounts(ctx, snap, info)
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
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, name, snapshots.Usage(du), opts...)
		if err != nil {
			return fmt.Errorf("commit snapshot %q: %w", key, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// Its upper directory is a lower layer from now on.
	return s.unmountMerged(id)
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
	if err := s.removeShort(id); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("remove snapshot link")
	}
	if err := s.removeNative(id); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("remove the layer's native metadata; Cleanup will retry")
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

// Cleanup removes snapshot directories the metastore does not know. It
// decides which those are in a writable transaction, so that no
// createSnapshot is between making its directory and committing its
// snapshot (containerd calls Cleanup after its garbage collection, while
// containers may be starting), and removes them after it.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	var orphans []string
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		known, err := storage.IDMap(ctx)
		if err != nil && !errdefs.IsNotFound(err) { // a new metastore has no buckets yet
			return err
		}
		entries, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
		if err != nil {
			return err
		}
		for _, e := range entries {
			if _, ok := known[e.Name()]; !ok {
				orphans = append(orphans, e.Name())
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, id := range orphans {
		dir := filepath.Join(s.root, "snapshots", id)
		if err := s.release(ctx, id); err != nil {
			return fmt.Errorf("cleanup %s: %w", dir, err)
		}
		if err := s.removeShort(id); err != nil {
			return fmt.Errorf("cleanup %s: %w", dir, err)
		}
		if err := s.removeNative(id); err != nil {
			return fmt.Errorf("cleanup %s: %w", dir, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("cleanup %s: %w", dir, err)
		}
		log.G(ctx).WithField("dir", dir).Debug("removed orphaned snapshot directory")
	}
	return nil
}

// Close stops the background recovery of unavailable layers and releases
// the metastore. It does not release lazy layers: the FileSystem's owner
// closes it.
func (s *Snapshotter) Close() error {
	s.stop()
	s.wg.Wait()
	return s.ms.Close()
}

// createSnapshot builds the directories of a new snapshot in a temporary
// place and renames them into snapshots/<id> inside the metastore transaction
// that creates the snapshot.
//
// Without withMounts it returns no mounts: the caller fills the snapshot
// itself and asks for them (mounts) only if it hands them out.
// newSnapshotDir makes a temporary directory under snapshots/ with what a
// snapshot of kind needs (fs, and work for an active one).
func (s *Snapshotter) newSnapshotDir(kind snapshots.Kind) (string, error) {
	td, err := os.MkdirTemp(filepath.Join(s.root, "snapshots"), "new-")
	if err != nil {
		return "", fmt.Errorf("create temporary snapshot directory: %w", err)
	}
	dirs := []string{"fs"}
	if kind == snapshots.KindActive {
		dirs = append(dirs, "work")
	}
	for _, d := range dirs {
		mode := os.FileMode(0o755)
		if d == "work" {
			mode = 0o711
		}
		if err := os.Mkdir(filepath.Join(td, d), mode); err != nil {
			os.RemoveAll(td)
			return "", fmt.Errorf("create temporary snapshot directory: %w", err)
		}
	}
	return td, nil
}

func (s *Snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt, withMounts bool) (_ []mount.Mount, snap storage.Snapshot, err error) {
	var td string // the new directory until it is renamed into place
	defer func() {
		if td != "" {
			if rerr := os.RemoveAll(td); rerr != nil {
				log.G(ctx).WithError(rerr).Warn("remove temporary snapshot directory")
			}
		}
	}()
	var info snapshots.Info
	// The directory is made inside the transaction, as containerd's
	// overlay snapshotter does, so that Cleanup, which decides in a
	// writable transaction, never takes it for an orphan.
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		td, err = s.newSnapshotDir(kind)
		if err != nil {
			return err
		}
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
	if !withMounts {
		return nil, snap, nil
	}
	mounts, err := s.mounts(ctx, snap, info)
	if err != nil {
		// A parent being obtained again did not come back in time: the
		// call failed, so leave no snapshot that would make containerd's
		// retry with the same key fail.
		if rerr := s.Remove(context.WithoutCancel(ctx), key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("remove snapshot whose mounts failed")
		}
		return nil, snap, err
	}
	return mounts, snap, nil
}

// mounts returns the mounts for snap: a bind mount when there is a single
// directory to show, an overlay otherwise. It waits for parent layers that
// are being fetched again (see lowerPaths).
func (s *Snapshotter) mounts(ctx context.Context, snap storage.Snapshot, _ snapshots.Info) ([]mount.Mount, error) {
	if len(snap.ParentIDs) == 0 {
		ro := "rw"
		if snap.Kind == snapshots.KindView {
			ro = "ro"
		}
		return []mount.Mount{{Type: "bind", Source: s.upperPath(snap.ID), Options: []string{ro, "rbind"}}}, nil
	}
	active := snap.Kind == snapshots.KindActive
	// A snapshot handed out as a native overlay stays one, also once its
	// layers are local: its upper directory is in that overlay.
	if m, ok, err := s.mountedNative(snap.ID, !active); ok || err != nil {
		return m, err
	}
	lowers, err := s.lowers(ctx, snap.ParentIDs, true)
	if err != nil {
		return nil, err
	}
	var options []string
	if active {
		options = append(options,
			"workdir="+s.workPath(snap.ID),
			"upperdir="+s.upperPath(snap.ID),
		)
	} else if len(lowers) == 1 {
		return []mount.Mount{{Type: "bind", Source: lowers[0].p.Lower, Options: []string{"ro", "rbind"}}}, nil
	}
	lowerdir, extra, err := s.presentLowers(snap.ID, active, lowers)
	if err != nil {
		return nil, err
	}
	options = append(options, "lowerdir="+lowerdir)
	options = append(options, extra...)
	options = append(options, s.options...)
	if strings.Contains(lowerdir, "::") {
		return s.nativeMount(snap.ID, !active, options)
	}
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: options}}, nil
}

func (s *Snapshotter) snapshotDir(id string) string {
	return filepath.Join(s.root, "snapshots", id)
}

func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "fs")
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
