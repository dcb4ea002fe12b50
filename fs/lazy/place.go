package lazy

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/extract"
)

// PopulateInto is Populate for a layer whose files are used as population
// verifies them (native metadata): it extracts the blob into staging, an
// empty directory on place's file system, and as soon as a regular file
// is complete there and its bytes match the TOC's chunk digests, links it
// at the same path under place. Nothing unverified ever appears under
// place, and nothing there is modified or removed: what an earlier attempt
// placed stays. Once the whole blob is verified, the rest of the tree
// (directories' attributes, symlinks, devices, whiteouts, files the TOC
// does not describe) moves from staging into place, which then holds the
// complete tree. The caller removes staging.
func (l *Layer) PopulateInto(ctx context.Context, staging, place string, o PopulateOptions) error {
	if err := os.MkdirAll(place, 0o755); err != nil {
		return err
	}
	p := &placer{l: l, staging: staging, place: place}
	if err := l.populate(ctx, staging, o, p.onEntry); err != nil {
		return err
	}
	if err := p.flush(); err != nil {
		return err
	}
	return p.merge(".")
}

// placer links verified files from a staging tree into place.
type placer struct {
	l              *Layer
	staging, place string
	// The entry extracted last, placed when the next one comes.
	name, link string
	typ        byte
	placed     int
}

func (p *placer) onEntry(hdr *tar.Header) error {
	err := p.flush()
	p.name, p.typ, p.link = cleanTarName(hdr.Name), hdr.Typeflag, ""
	if hdr.Typeflag == tar.TypeLink {
		p.link = cleanTarName(hdr.Linkname)
	}
	return err
}

// flush places the entry extracted last, if it is a regular file or a
// hard link to one already placed.
func (p *placer) flush() error {
	name, typ, link := p.name, p.typ, p.link
	p.name = ""
	if name == "" || name == "." || strings.HasPrefix(filepath.Base(name), ".wh.") {
		return nil // whiteouts are converted, not extracted as files
	}
	var src string
	switch typ {
	case tar.TypeReg, tar.TypeRegA: //nolint:staticcheck // old tars use TypeRegA
		f, err := openBeneath(p.staging, name)
		if err != nil {
			return fmt.Errorf("place %s: %w", name, err)
		}
		err = p.l.verifyFile(name, f)
		f.Close()
		switch {
		case errors.Is(err, errNotInIndex):
			return nil // moved once the whole blob is verified
		case err != nil:
			return fmt.Errorf("layer %s: %w: %w", p.l.desc.Digest, err, extract.ErrInvalid)
		}
		src = filepath.Join(p.staging, name)
	case tar.TypeLink:
		if _, err := os.Lstat(filepath.Join(p.place, link)); err != nil {
			return nil // its target is not placed: moved at the end
		}
		src = filepath.Join(p.place, link)
	default:
		return nil
	}
	if err := mkdirBeneath(p.place, filepath.Dir(name)); err != nil {
		return fmt.Errorf("place %s: %w", name, err)
	}
	// link(2) makes the name appear with the complete file, or fails.
	dst := filepath.Join(p.place, name)
	err := os.Link(src, dst)
	switch {
	case errors.Is(err, os.ErrExist) && typ != tar.TypeLink:
		// Placed before (PlaceNow, or an attempt before a restart) with
		// the same verified bytes; the tar's attributes are the exact
		// ones (a TOC's times are rounded), and containers see the
		// metadata tree's, so they can be set.
		var st unix.Stat_t
		if err := unix.Lstat(src, &st); err != nil {
			return err
		}
		if err := copyAttrs(src, dst, &st); err != nil {
			return fmt.Errorf("place %s: %w", name, err)
		}
	case err != nil && !errors.Is(err, os.ErrExist):
		return fmt.Errorf("place %s: %w", name, err)
	}
	p.placed++
	return nil
}

// mkdirBeneath makes directory rel (and its parents) under root, refusing
// to pass through anything but a directory.
func mkdirBeneath(root, rel string) error {
	if rel == "." {
		return nil
	}
	dir := root
	for _, name := range strings.Split(rel, "/") {
		dir = filepath.Join(dir, name)
		st, err := os.Lstat(dir)
		switch {
		case err == nil && st.IsDir():
			continue
		case err == nil:
			return fmt.Errorf("%s is not a directory", dir)
		case !errors.Is(err, os.ErrNotExist):
			return err
		}
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	return nil
}

// merge moves what staging holds at rel and place lacks into place, and
// gives place's directories the attributes of staging's, deepest first.
func (p *placer) merge(rel string) error {
	src, dst := filepath.Join(p.staging, rel), filepath.Join(p.place, rel)
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range entries {
		s, d := filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())
		st, err := os.Lstat(d)
		switch {
		case errors.Is(err, os.ErrNotExist):
			if err := os.Rename(s, d); err != nil {
				return err
			}
			continue
		case err != nil:
			return err
		}
		if e.IsDir() && st.IsDir() {
			// Moving entries out of s changes its times: take its
			// attributes first.
			var attrs unix.Stat_t
			if err := unix.Lstat(s, &attrs); err != nil {
				return err
			}
			r := filepath.Join(rel, e.Name())
			if err := p.merge(r); err != nil {
				return err
			}
			if err := copyAttrs(s, d, &attrs); err != nil {
				return fmt.Errorf("directory %s: %w", r, err)
			}
		}
		// Anything else in place was placed there verified: kept.
	}
	return nil
}

// copyAttrs gives dst, a directory or regular file, the mode, owner and
// times st of src, and its extended attributes.
func copyAttrs(src, dst string, st *unix.Stat_t) error {
	if err := unix.Lchown(dst, int(st.Uid), int(st.Gid)); err != nil {
		return err
	}
	if err := unix.Chmod(dst, st.Mode&0o7777); err != nil {
		return err
	}
	if err := copyXattrs(src, dst); err != nil {
		return err
	}
	ts := []unix.Timespec{st.Atim, st.Mtim}
	return unix.UtimesNanoAt(unix.AT_FDCWD, dst, ts, unix.AT_SYMLINK_NOFOLLOW)
}

func copyXattrs(src, dst string) error {
	size, err := unix.Llistxattr(src, nil)
	if err != nil || size == 0 {
		return err
	}
	buf := make([]byte, size)
	if size, err = unix.Llistxattr(src, buf); err != nil {
		return err
	}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:size]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		n, err := unix.Lgetxattr(src, name, nil)
		if err != nil {
			return err
		}
		v := make([]byte, n)
		if n, err = unix.Lgetxattr(src, name, v); err != nil {
			return err
		}
		if err := unix.Lsetxattr(dst, name, v[:n], 0); err != nil {
			return fmt.Errorf("xattr %s: %w", name, err)
		}
	}
	return nil
}

// maxPlaceNow bounds the size of a file PlaceNow places.
const maxPlaceNow = 1 << 20

// PlaceNow places the regular files names (paths relative to the layer
// root, at most 1 MiB each) where SetPlaced said, from verified chunks,
// fetching what the cache lacks. containerd reads the image's users and
// groups out of a container's root before the container starts: placed
// first, those files are native for the container's whole life instead of
// bound to FUSE. tmp is a directory on the file system of that place.
// Names the layer lacks are skipped.
func (l *Layer) PlaceNow(ctx context.Context, tmp string, names ...string) error {
	place := l.localDir()
	if place == "" {
		return errors.New("place files: the layer has no place for them")
	}
	var todo []string
	var nums []uint32
	for _, name := range names {
		num, ok := l.ix.lookupPath(name)
		if !ok {
			continue
		}
		e := &l.ix.entries[num]
		if e.mode&unix.S_IFMT != unix.S_IFREG || e.size == 0 || e.size > maxPlaceNow {
			continue
		}
		if _, err := os.Lstat(filepath.Join(place, name)); err == nil {
			continue
		}
		todo, nums = append(todo, name), append(nums, num)
	}
	// The files' chunks in as few requests as a replay makes (one for
	// files near each other, as /etc/passwd and /etc/group are), at once;
	// reading them one after the other took a round trip each. What this
	// fails to fetch, the reads below fetch again and report.
	if groups := l.f.replayPlan(l.ix, nums); len(groups) > 0 {
		_ = l.f.fetchGroups(ctx, groups)
	}
	var errs []error
	for i, name := range todo {
		e := &l.ix.entries[nums[i]]
		buf := make([]byte, e.size)
		n, err := l.f.readAt(ctx, l.ix.fileChunks(e), e.size, buf, 0, 0)
		if err != nil && n < len(buf) {
			errs = append(errs, fmt.Errorf("place %s: %w", name, err))
			continue
		}
		if err := placeBytes(tmp, place, name, buf); err != nil {
			errs = append(errs, fmt.Errorf("place %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// placeBytes writes b to a new file in tmp and links it at name under
// place, where it appears complete or not at all.
func placeBytes(tmp, place, name string, b []byte) error {
	f, err := os.CreateTemp(tmp, "place-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := mkdirBeneath(place, filepath.Dir(name)); err != nil {
		return err
	}
	if err := os.Link(f.Name(), filepath.Join(place, name)); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return nil
}
