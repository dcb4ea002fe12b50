package lazy

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

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
	p := newPlacer(l, staging, place)
	err := l.populate(ctx, staging, o, p.onEntry)
	if ferr := p.finish(err == nil); err == nil {
		err = ferr
	}
	if err != nil {
		return err
	}
	return p.merge(".")
}

// placer links verified files from a staging tree into place. Extraction
// hands it each entry once the entry is complete, when the next one
// begins; a goroutine of its own verifies and links them, in order, while
// extraction goes on: verifying reads each file back and hashes it, which
// took as much of a core as creating the files (python's base layer, 6,672
// entries). An entry that would replace or remove a name handed on and not
// yet placed, or one of its directories, waits until the placer has
// caught up, so that the placer never reads a file extraction is
// rewriting.
type placer struct {
	l              *Layer
	staging, place string
	last           placeItem // the entry extracted last, handed on when the next one comes
	todo           chan placeItem
	done           chan struct{}

	mu      sync.Mutex
	caught  sync.Cond      // signalled when pending empties or err is set
	pending map[string]int // names handed on and not placed, and their directories
	err     error          // the first error placing

	dirs map[string]bool // directories under place known to exist (placer goroutine)
}

// placeItem is an entry of the tar for the placer.
type placeItem struct {
	name, link string
	typ        byte
}

// placeQueue is how many entries extraction may be ahead of the placer.
const placeQueue = 256

func newPlacer(l *Layer, staging, place string) *placer {
	p := &placer{
		l: l, staging: staging, place: place,
		todo:    make(chan placeItem, placeQueue),
		done:    make(chan struct{}),
		pending: map[string]int{},
		dirs:    map[string]bool{},
	}
	p.caught.L = &p.mu
	go p.run()
	return p
}

func (p *placer) onEntry(hdr *tar.Header) error {
	if err := p.handOn(); err != nil {
		return err
	}
	name := cleanTarName(hdr.Name)
	p.last = placeItem{name: name, typ: hdr.Typeflag}
	if hdr.Typeflag == tar.TypeLink {
		p.last.link = cleanTarName(hdr.Linkname)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	// A whiteout removes a name; an entry replaces what its name holds
	// (a directory with all under it).
	if p.pending[name] > 0 || strings.HasPrefix(filepath.Base(name), ".wh.") {
		for len(p.pending) > 0 && p.err == nil {
			p.caught.Wait()
		}
	}
	return p.err
}

// handOn passes the entry extracted last to the placer, if it is one
// placed while extracting: a regular file, or a hard link to one.
func (p *placer) handOn() error {
	it := p.last
	p.last = placeItem{}
	switch {
	case it.name == "" || it.name == "." || strings.HasPrefix(filepath.Base(it.name), ".wh."):
		return nil // whiteouts are converted, not extracted as files
	case it.typ != tar.TypeReg && it.typ != tar.TypeRegA && it.typ != tar.TypeLink: //nolint:staticcheck // old tars use TypeRegA
		return nil
	}
	p.mu.Lock()
	err := p.err
	if err == nil {
		for n := it.name; n != "."; n = filepath.Dir(n) {
			p.pending[n]++
		}
	}
	p.mu.Unlock()
	if err != nil {
		return err
	}
	p.todo <- it
	return nil
}

// finish hands on the last entry if extraction succeeded, and returns
// once the placer has stopped, with its first error.
func (p *placer) finish(ok bool) error {
	var err error
	if ok {
		err = p.handOn()
	}
	close(p.todo)
	<-p.done
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// run places the entries handed on, in order; after an error it only
// takes them off the queue.
func (p *placer) run() {
	defer close(p.done)
	for it := range p.todo {
		p.mu.Lock()
		failed := p.err != nil
		p.mu.Unlock()
		var err error
		if !failed {
			err = p.placeEntry(it)
		}
		p.mu.Lock()
		for n := it.name; n != "."; n = filepath.Dir(n) {
			if p.pending[n]--; p.pending[n] <= 0 {
				delete(p.pending, n)
			}
		}
		if err != nil && p.err == nil {
			p.err = err
		}
		if len(p.pending) == 0 || p.err != nil {
			p.caught.Broadcast()
		}
		p.mu.Unlock()
	}
}

// placeEntry places it, a regular file or a hard link, if it is verified
// (a link: if its target was placed).
func (p *placer) placeEntry(it placeItem) error {
	name := it.name
	var src string
	switch it.typ {
	case tar.TypeLink:
		if _, err := os.Lstat(filepath.Join(p.place, it.link)); err != nil {
			return nil // its target is not placed: moved at the end
		}
		src = filepath.Join(p.place, it.link)
	default:
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
	}
	if err := p.mkdir(filepath.Dir(name)); err != nil {
		return fmt.Errorf("place %s: %w", name, err)
	}
	// link(2) makes the name appear with the complete file, or fails.
	dst := filepath.Join(p.place, name)
	err := os.Link(src, dst)
	switch {
	case errors.Is(err, os.ErrExist) && it.typ != tar.TypeLink:
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
	return nil
}

// mkdir is mkdirBeneath(p.place, rel), remembering the directories that
// exist: nothing under place is removed while the layer exists.
func (p *placer) mkdir(rel string) error {
	if rel == "." || p.dirs[rel] {
		return nil
	}
	if err := p.mkdir(filepath.Dir(rel)); err != nil {
		return err
	}
	// Its parents are directories (not symlinks): one component to check.
	if err := mkdirOne(filepath.Join(p.place, rel)); err != nil {
		return err
	}
	p.dirs[rel] = true
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
		if err := mkdirOne(dir); err != nil {
			return err
		}
	}
	return nil
}

// mkdirOne makes directory dir unless it is one, refusing anything else
// there (a symlink included).
func mkdirOne(dir string) error {
	st, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
		st, err = os.Lstat(dir)
	}
	switch {
	case err != nil:
		return err
	case !st.IsDir():
		return fmt.Errorf("%s is not a directory", dir)
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
