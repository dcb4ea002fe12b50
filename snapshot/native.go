package snapshot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

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
