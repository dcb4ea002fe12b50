package extract

import (
	"archive/tar"
	"fmt"
	"path"
	"strings"
)

// pathGuard checks each tar header before containerd's archive package acts
// on it. containerd scopes every path to the root, silently rewriting one
// that would escape; lazylayer refuses such a layer instead, because an image
// that tries it is not one to run.
type pathGuard struct {
	hide         map[string]bool     // root entries not to extract
	symlinks     map[string]struct{} // names this layer made symlinks
	dirs         map[string]struct{} // directories this layer lists
	implicitDirs bool                // an entry's parent was not listed
}

func newPathGuard(hide []string) *pathGuard {
	g := &pathGuard{hide: map[string]bool{}, symlinks: map[string]struct{}{}, dirs: map[string]struct{}{}}
	for _, h := range hide {
		g.hide[h] = true
	}
	return g
}

// check is an archive.Filter. hdr.Name has been cleaned by archive.Apply.
func (g *pathGuard) check(hdr *tar.Header) (bool, error) {
	name := hdr.Name
	if err := g.checkPath(name); err != nil {
		return false, fmt.Errorf("tar entry %q: %w", name, err)
	}
	if g.hide[name] {
		return false, nil
	}
	if hdr.Typeflag == tar.TypeLink {
		if err := g.checkPath(path.Clean(hdr.Linkname)); err != nil {
			return false, fmt.Errorf("tar entry %q: hard link target %q: %w", name, hdr.Linkname, err)
		}
	}
	parent := path.Dir(name)
	if _, ok := g.dirs[parent]; !ok && parent != "." && parent != "/" {
		g.implicitDirs = true
	}
	switch hdr.Typeflag {
	case tar.TypeSymlink:
		g.symlinks[name] = struct{}{}
		delete(g.dirs, name)
	case tar.TypeDir:
		delete(g.symlinks, name)
		g.dirs[name] = struct{}{}
	default:
		delete(g.symlinks, name)
		delete(g.dirs, name)
	}
	return true, nil
}

// checkPath refuses a cleaned path that is absolute, climbs out of the root,
// or passes through a symlink this layer created.
func (g *pathGuard) checkPath(p string) error {
	switch {
	case path.IsAbs(p):
		return fmt.Errorf("absolute path: %w", ErrInvalid)
	case p == ".." || strings.HasPrefix(p, "../"):
		return fmt.Errorf("path escapes the layer root: %w", ErrInvalid)
	}
	for dir := path.Dir(p); dir != "." && dir != "/"; dir = path.Dir(dir) {
		if _, ok := g.symlinks[dir]; ok {
			return fmt.Errorf("path goes through symlink %q: %w", dir, ErrInvalid)
		}
	}
	return nil
}
