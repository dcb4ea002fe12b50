package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/meta"
)

// Presentation is how a committed layer is shown to overlay.
type Presentation struct {
	// Lower is the directory to use as a plain lower layer.
	Lower string
	// Meta is the layer's metadata tree, or "" when it has none: a tree
	// of directories and overlay metacopy files whose redirects find the
	// files' data in the data-only layers Data, in order.
	Meta string
	Data []string
}

// NativeFileSystem is a FileSystem that presents layers to overlay with
// native metadata: a lazy layer as its metadata tree over data-only
// layers (local data, then its FUSE mount), so that lookups, stat and
// readdir never reach the daemon and every file a container first opens
// once its data is local reads natively.
type NativeFileSystem interface {
	FileSystem
	// Present says how the committed layer in dir is shown: lazy tells
	// whether the snapshotter holds it lazy.
	Present(dir string, lazy bool) Presentation
	// WaitPresent waits until the lazy layer of dir is presented as it
	// stays while lazy (its metadata tree may still be being built when
	// its Prepare returns), or ctx is done. Mounts wait for it.
	WaitPresent(ctx context.Context, dir string) error
	// Remove deletes what the layer of dir keeps outside dir, once its
	// snapshot is removed (after Release).
	Remove(dir string) error
}

// removeNative deletes what the FileSystem keeps outside the directory of
// snapshot id.
func (s *Snapshotter) removeNative(id string) error {
	if nfs, ok := s.fs.(NativeFileSystem); ok {
		return nfs.Remove(s.snapshotDir(id))
	}
	return nil
}

// metacopyMarker, in a snapshot directory, records that the snapshot was
// handed out in an overlay mounted with metacopy=on: its upper directory
// may hold metadata-only copy-ups, so every mount that uses it needs the
// option too.
const metacopyMarker = "metacopy"

// lower is one layer of an overlay mount.
type lower struct {
	id   string
	lazy bool
	p    Presentation
}

// presentLowers returns the lower directories and extra options of a
// mount over the layers ls (top first), for the snapshot id: native
// metadata when a lazy layer has a metadata tree and nothing below it
// could hijack its redirects, plain directories otherwise.
func (s *Snapshotter) presentLowers(id string, active bool, ls []lower) (string, []string, error) {
	native := false
	for _, l := range ls {
		if l.lazy && l.p.Meta != "" {
			native = true
		}
	}
	if native {
		for _, l := range ls {
			if l.p.Meta == "" {
				if err := meta.CheckLower(l.p.Lower); err != nil {
					native = false
				}
			}
		}
	}
	metacopy := native || s.hasMarker(id)
	for _, l := range ls {
		metacopy = metacopy || s.hasMarker(l.id)
	}
	var opts []string
	if metacopy {
		opts = append(opts, meta.MetacopyOption)
		if active {
			if err := os.WriteFile(filepath.Join(s.snapshotDir(id), metacopyMarker), nil, 0o600); err != nil {
				return "", nil, err
			}
		}
	}
	if !native {
		dirs := make([]string, len(ls))
		for i, l := range ls {
			dirs[i] = l.p.Lower
		}
		return strings.Join(dirs, ":"), opts, nil
	}
	var dirs, data []string
	seen := map[string]bool{}
	for _, l := range ls {
		if l.p.Meta == "" {
			dirs = append(dirs, s.short(l.id, l.p.Lower))
			continue
		}
		dirs = append(dirs, s.short(l.id, l.p.Meta))
		for _, d := range l.p.Data {
			if !seen[d] {
				seen[d] = true
				data = append(data, d)
			}
		}
	}
	// The shared data directory first: it serves every file that is
	// local, whichever layer it belongs to.
	for i := range data {
		data[i] = s.short(owner(data[i]), data[i])
	}
	ld, err := meta.LowerDir(dirs, sortData(data))
	if err != nil {
		return "", nil, err
	}
	return ld, opts, nil
}

// sortData puts the data directories that are not FUSE mounts (shared,
// outside the snapshot directories) before the others, keeping order.
func sortData(data []string) []string {
	var shared, mounts []string
	for _, d := range data {
		if strings.HasSuffix(d, "/lazy") {
			mounts = append(mounts, d)
		} else {
			shared = append(shared, d)
		}
	}
	return append(shared, mounts...)
}

// owner is the snapshot id of a path in a snapshot directory, "" for
// others.
func owner(p string) string {
	dir, rest, ok := strings.Cut(p, "/snapshots/")
	if !ok || dir == "" {
		return ""
	}
	id, _, _ := strings.Cut(rest, "/")
	return id
}

func (s *Snapshotter) hasMarker(id string) bool {
	_, err := os.Lstat(filepath.Join(s.snapshotDir(id), metacopyMarker))
	return err == nil
}

// short returns p, a path in snapshot id's directory, through the
// symbolic link root/l/<id> to it: mount(2) takes every option in one
// page, and a native mount names three directories a lazy layer.
func (s *Snapshotter) short(id, p string) string {
	dir := s.snapshotDir(id)
	rel, err := filepath.Rel(dir, p)
	if id == "" || err != nil || strings.HasPrefix(rel, "..") {
		return p
	}
	link := filepath.Join(s.root, "l", id)
	if target, err := os.Readlink(link); err != nil || target != dir {
		if err := os.MkdirAll(filepath.Join(s.root, "l"), 0o700); err != nil {
			return p
		}
		os.Remove(link)
		if err := os.Symlink(dir, link); err != nil && !errors.Is(err, os.ErrExist) {
			return p
		}
	}
	return filepath.Join(link, rel)
}

// removeShort removes the symbolic link short made for snapshot id.
func (s *Snapshotter) removeShort(id string) error {
	err := os.Remove(filepath.Join(s.root, "l", id))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", filepath.Join(s.root, "l", id), err)
	}
	return nil
}

// mergedDir is where the snapshotter mounts a snapshot's native overlay.
const mergedDir = "merged"

// maxOptions is what mount(2) takes of an option string: one page.
const maxOptions = 4095

// nativeMount mounts the overlay that options describe at the snapshot's
// merged directory, once, and hands it out as a bind mount. containerd
// 2.4 reads an overlay's directories itself where it can (its fsview, for
// the image's users and groups, before a container starts), and that
// reader knows neither data-only layers ("::") nor metacopy files, so an
// overlay with native metadata must reach containerd already mounted.
func (s *Snapshotter) nativeMount(id string, ro bool, options []string) ([]mount.Mount, error) {
	s.mountMu.Lock()
	defer s.mountMu.Unlock()
	merged := filepath.Join(s.snapshotDir(id), mergedDir)
	if err := os.MkdirAll(merged, 0o755); err != nil {
		return nil, err
	}
	mounted, err := mountinfo.Mounted(merged)
	if err != nil {
		return nil, err
	}
	if !mounted {
		if err := mountOverlay(merged, ro, options); err != nil {
			return nil, fmt.Errorf("mount overlay for snapshot %s: %w", id, err)
		}
	}
	return bindMerged(merged, ro), nil
}

func bindMerged(merged string, ro bool) []mount.Mount {
	rw := "rw"
	if ro {
		rw = "ro"
	}
	return []mount.Mount{{Type: "bind", Source: merged, Options: []string{rw, "rbind"}}}
}

// mountedNative returns the mounts of snapshot id if its native overlay is
// mounted.
func (s *Snapshotter) mountedNative(id string, ro bool) ([]mount.Mount, bool, error) {
	s.mountMu.Lock()
	defer s.mountMu.Unlock()
	merged := filepath.Join(s.snapshotDir(id), mergedDir)
	if _, err := os.Lstat(merged); errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	mounted, err := mountinfo.Mounted(merged)
	if err != nil || !mounted {
		return nil, false, err
	}
	return bindMerged(merged, ro), true, nil
}

// unmountMerged detaches the snapshot's native overlay, if mounted; a
// container still using it keeps it until it stops.
func (s *Snapshotter) unmountMerged(id string) error {
	s.mountMu.Lock()
	defer s.mountMu.Unlock()
	merged := filepath.Join(s.snapshotDir(id), mergedDir)
	err := unix.Unmount(merged, unix.MNT_DETACH)
	if err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount %s: %w", merged, err)
	}
	return nil
}

// mountOverlay mounts an overlay with options at target. It gives the
// kernel one layer at a time (fsconfig lowerdir+ and datadir+, Linux 6.8
// and later), so the number of layers is not bound by mount(2)'s one-page
// option string; on older kernels it falls back to mount(2).
func mountOverlay(target string, ro bool, options []string) error {
	err := fsmountOverlay(target, ro, options)
	if err == nil || !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) {
		return err
	}
	data := strings.Join(options, ",")
	if len(data) > maxOptions {
		return fmt.Errorf("the options take %d bytes, more than the %d mount(2) takes, and this kernel cannot take layers one by one (%w)", len(data), maxOptions, err)
	}
	var flags uintptr
	if ro {
		flags = unix.MS_RDONLY
	}
	if err := unix.Mount("overlay", target, "overlay", flags, data); err != nil {
		return fmt.Errorf("mount(2) -o %s: %w", data, err)
	}
	return nil
}

func fsmountOverlay(target string, ro bool, options []string) error {
	fd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(fd)
	set := func(key, value string) error {
		if err := unix.FsconfigSetString(fd, key, value); err != nil {
			return fmt.Errorf("fsconfig %s=%s: %w", key, value, err)
		}
		return nil
	}
	if err := set("source", "overlay"); err != nil {
		return err
	}
	for _, o := range options {
		key, value, hasValue := strings.Cut(o, "=")
		switch {
		case key == "lowerdir":
			lower, data, _ := strings.Cut(value, "::")
			for _, d := range strings.Split(lower, ":") {
				if err := set("lowerdir+", d); err != nil {
					return err
				}
			}
			for _, d := range strings.Split(data, "::") {
				if d == "" {
					continue
				}
				if err := set("datadir+", d); err != nil {
					return err
				}
			}
		case hasValue:
			if err := set(key, value); err != nil {
				return err
			}
		default:
			if err := unix.FsconfigSetFlag(fd, key); err != nil {
				return fmt.Errorf("fsconfig %s: %w", key, err)
			}
		}
	}
	if err := unix.FsconfigCreate(fd); err != nil {
		return fmt.Errorf("create overlay: %w", err)
	}
	attrs := 0
	if ro {
		attrs = unix.MOUNT_ATTR_RDONLY
	}
	mfd, err := unix.Fsmount(fd, unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return fmt.Errorf("fsmount overlay: %w", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move overlay mount to %s: %w", target, err)
	}
	return nil
}
