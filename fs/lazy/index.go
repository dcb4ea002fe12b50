package lazy

import (
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/meta"
)

// isFormatName reports whether base, at a layer's root, is one of
// FormatNames: not part of the image's file system, so hidden.
func isFormatName(base string) bool {
	for _, n := range FormatNames() {
		if base == n {
			return true
		}
	}
	return false
}

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	opaqueXattr    = "trusted.overlay.opaque"
)

// index is a layer's table of contents in a compact, immutable form: the
// parsed TOC is dropped once the index is built. Entry i has inode number
// i+1; entry 0 is the root. All fields are read-only after build.
type index struct {
	entries  []entry
	children []uint32 // child entry numbers of every directory, by directory, sorted by name
	names    []string // the name of each child in children (hard links have several)
	chunks   []chunk  // chunks of every regular file, by file, in file order

	links  map[uint32]string            // symlink targets
	rdevs  map[uint32]uint32            // device numbers
	xattrs map[uint32]map[string][]byte // extended attributes
	opaque map[uint32]bool              // directories with an opaque marker

	// byOffset lists chunks in blob order (indices into chunks), to find
	// a chunk's neighbours in the blob.
	byOffset []uint32

	// view says whether the view is exact (see Layer.View).
	view string

	// prefetchEnd is the blob offset where the files eStargz prioritized
	// end (the prefetch landmark); 0 when the layer has no landmark.
	prefetchEnd int64
}

// after returns the chunks that follow, in the blob, the compressed stream
// ending at end, until limit; the files next to each other in the tar are
// often read together.
func (ix *index) after(end, limit int64) []chunk {
	i := sort.Search(len(ix.byOffset), func(i int) bool { return ix.chunks[ix.byOffset[i]].offset >= end })
	var out []chunk
	for ; i < len(ix.byOffset); i++ {
		c := ix.chunks[ix.byOffset[i]]
		if c.end > limit {
			break
		}
		out = append(out, c)
	}
	return out
}

// entry is one inode: 48 bytes. Names live in index.names.
type entry struct {
	mode     uint32 // st_mode, type bits included
	uid, gid uint32
	nlink    uint32
	size     int64
	mtime    int64  // nanoseconds since the epoch
	first    uint32 // first child (directories) or chunk (files)
	count    uint32 // number of children or chunks
}

// chunk locates a piece of a file's content in the blob.
type chunk struct {
	offset  int64 // where the compressed stream holding the chunk starts
	end     int64 // where that stream ends
	inner   int64 // where the chunk starts in the decompressed stream
	fileOff int64 // where the chunk starts in the file
	size    int64
	digest  [32]byte // sha256 of the chunk's bytes
}

func (c *chunk) dgst() digest.Digest {
	return digest.NewDigestFromBytes(digest.SHA256, c.digest[:])
}

func (ix *index) dirChildren(e *entry) []uint32 { return ix.children[e.first : e.first+e.count] }
func (ix *index) dirNames(e *entry) []string    { return ix.names[e.first : e.first+e.count] }
func (ix *index) fileChunks(e *entry) []chunk   { return ix.chunks[e.first : e.first+e.count] }

// lookup finds name among the children of directory e.
func (ix *index) lookup(e *entry, name string) (uint32, bool) {
	names := ix.dirNames(e)
	i := sort.SearchStrings(names, name)
	if i < len(names) && names[i] == name {
		return ix.dirChildren(e)[i], true
	}
	return 0, false
}

// buildIndex converts an opened eStargz (or zstd:chunked) reader into an
// index. Whiteouts become overlay whiteouts (0/0 character devices), opaque
// markers become the overlay opaque xattr on their directory, and eStargz's
// own metadata files are hidden, so the tree is what overlayfs expects of a
// lower layer.
//
// Hard-linked files take the attributes links reports; it is called only
// when the layer has hard links, since for estargz's Reader it parses the
// TOC again (a tocTree has the entries at hand).
//
// exact, when not nil, is the layer's verified exact record: names, link
// targets and mtimes are taken from it where the TOC cannot say them.
func buildIndex(r *estargz.Reader, exact map[string]*exactInfo, links func() (map[string]*linkAttrs, error)) (*index, error) {
	return buildIndexFrom[*estargz.TOCEntry](readerSource{r}, exact, links)
}

// buildIndexFrom is buildIndex of a TOC's tree, estargz's or a tocTree.
func buildIndexFrom[K comparable](r tocSource[K], exact map[string]*exactInfo, links func() (map[string]*linkAttrs, error)) (*index, error) {
	root, ok := r.lookup("")
	if !ok {
		return nil, fmt.Errorf("TOC has no root directory")
	}
	b := &builder[K]{
		r:     r,
		exact: exact,
		ix:    &index{links: map[uint32]string{}, rdevs: map[uint32]uint32{}, xattrs: map[uint32]map[string][]byte{}, opaque: map[uint32]bool{}},
	}
	// Sized once from the tree's counts, the index's lists never grow
	// (which would hold the old and new arrays at once, next to the tree)
	// and are rarely cloned below; without hard links no entry is reached
	// twice, and seen (a map entry per TOC entry) is not needed.
	sz := r.sizes()
	if sz.links {
		b.seen = map[K]uint32{}
	}
	b.ix.entries = make([]entry, 0, sz.entries)
	b.ix.chunks = make([]chunk, 0, sz.chunks)
	b.ix.children = make([]uint32, 0, sz.children)
	b.ix.names = make([]string, 0, sz.children)
	if lm, ok := r.lookup(estargz.PrefetchLandmark); ok {
		b.ix.prefetchEnd = r.entry(lm).Offset
	}
	b.linked = map[uint32]string{}
	b.ix.entries = append(b.ix.entries, entry{nlink: 1})
	if err := b.fill(0, root); err != nil {
		return nil, err
	}
	// The index stays for as long as the layer is lazy: drop what
	// appending left spare.
	b.ix.entries, b.ix.chunks = trim(b.ix.entries), trim(b.ix.chunks)
	b.ix.children, b.ix.names = trim(b.ix.children), trim(b.ix.names)
	b.ix.byOffset = make([]uint32, len(b.ix.chunks))
	for i := range b.ix.byOffset {
		b.ix.byOffset[i] = uint32(i)
	}
	sort.Slice(b.ix.byOffset, func(i, j int) bool {
		return b.ix.chunks[b.ix.byOffset[i]].offset < b.ix.chunks[b.ix.byOffset[j]].offset
	})
	if len(b.linked) > 0 {
		attrs, err := links()
		if err != nil {
			return nil, err
		}
		for n, name := range b.linked {
			a, ok := attrs[name]
			if !ok {
				continue
			}
			e := &b.ix.entries[n]
			e.mode = e.mode&syscall.S_IFMT | a.mode&0o777 | modeBits(a.mode)
			e.uid, e.gid, e.mtime = a.uid, a.gid, unixNano(a.mtime)
			if x := b.exact[name]; x != nil && x.mtime != 0 {
				e.mtime = x.mtime
			}
			if xa := imageXattrs(a.xattrs, true); len(xa) > 0 {
				b.ix.xattrs[n] = xa
			} else {
				delete(b.ix.xattrs, n)
			}
		}
	}
	return b.ix, nil
}

// trim returns s without spare capacity, cloning it only when that is
// more than an eighth of it.
func trim[S ~[]E, E any](s S) S {
	if cap(s)-len(s) <= cap(s)/8 {
		return s
	}
	return slices.Clone(s)
}

type builder[K comparable] struct {
	r      tocSource[K]
	exact  map[string]*exactInfo // the verified exact record, by TOC name; nil without
	ix     *index
	seen   map[K]uint32      // hard links: TOC entry → entry number; nil when the TOC has none
	linked map[uint32]string // hard-linked entries → their first name
}

// fill sets entry n from the TOC entry te, recursing into directories.
func (b *builder[K]) fill(n uint32, k K) error {
	te := b.r.entry(k)
	e := entry{
		uid:   te.UID,
		gid:   te.GID,
		nlink: b.ix.entries[n].nlink, // counted by dir for hard links
		size:  te.Size,
		mtime: b.mtime(te),
	}
	perm := te.Mode&0o777 | modeBits(te.Mode)
	switch te.Type {
	case "dir":
		e.mode = syscall.S_IFDIR | perm
		e.size = 4096
	case "reg":
		e.mode = syscall.S_IFREG | perm
	case "symlink":
		e.mode = syscall.S_IFLNK | 0o777
		target := te.LinkName
		if x := b.exact[te.Name]; x != nil && x.link != "" {
			target = x.link
		}
		e.size = int64(len(target))
		b.ix.links[n] = target
	case "char", "block":
		e.mode = syscall.S_IFCHR | perm
		if te.Type == "block" {
			e.mode = syscall.S_IFBLK | perm
		}
		b.ix.rdevs[n] = uint32(unix.Mkdev(te.DevMajor, te.DevMinor))
	case "fifo":
		e.mode = syscall.S_IFIFO | perm
	default:
		return fmt.Errorf("TOC entry %q: unsupported type %q", te.Name, te.Type)
	}
	if xa := imageXattrs(te.Xattrs, te.Type == "reg" || te.Type == "dir"); len(xa) > 0 {
		b.ix.xattrs[n] = xa
	}
	if te.Type == "reg" {
		if err := b.fileChunks(&e, te); err != nil {
			return err
		}
	}
	b.ix.entries[n] = e
	if te.Type == "dir" {
		return b.dir(n, k)
	}
	return nil
}

// dir adds the children of directory n.
func (b *builder[K]) dir(n uint32, dk K) error {
	te := b.r.entry(dk)
	type kid struct {
		name string
		k    K
		wh   bool // a whiteout: a 0/0 character device named name
	}
	var kids []kid
	var err error
	b.r.forEachChild(dk, func(base string, k K) bool {
		if n == 0 && isFormatName(base) {
			return true
		}
		if x := b.exact[path.Join(te.Name, base)]; x != nil && x.name != "" {
			base = x.name
		}
		switch {
		case base == opaqueMarker:
			xa := map[string][]byte{}
			for k, v := range b.ix.xattrs[n] {
				xa[k] = v
			}
			xa[opaqueXattr] = []byte("y")
			b.ix.xattrs[n] = xa
			b.ix.opaque[n] = true
		case strings.HasPrefix(base, whiteoutPrefix):
			kids = append(kids, kid{name: base[len(whiteoutPrefix):], k: k, wh: true})
		case base == "" || base == "." || base == ".." || strings.Contains(base, "/"):
			err = fmt.Errorf("TOC entry %q: invalid name %q", te.Name, base)
			return false
		default:
			kids = append(kids, kid{name: base, k: k})
		}
		return true
	})
	if err != nil {
		return err
	}
	// A name that is both whited out and created in this layer is the
	// created entry: extraction (containerd's too) fails on a whiteout of
	// a name the layer made before, so the whiteout came first and the
	// last entry wins.
	sort.Slice(kids, func(i, j int) bool {
		if kids[i].name != kids[j].name {
			return kids[i].name < kids[j].name
		}
		return kids[i].wh && !kids[j].wh
	})
	w := 0
	for i := range kids {
		if i+1 < len(kids) && kids[i+1].name == kids[i].name {
			continue
		}
		kids[w] = kids[i]
		w++
	}
	kids = kids[:w]

	first := uint32(len(b.ix.children))
	numbers := make([]uint32, len(kids))
	var fills []int
	for i, k := range kids {
		kte := b.r.entry(k.k)
		if k.wh {
			numbers[i] = b.add(entry{mode: syscall.S_IFCHR, uid: kte.UID,
				gid: kte.GID, nlink: 1, mtime: b.mtime(kte)})
			continue
		}
		if m, ok := b.seen[k.k]; ok {
			if kte.Type == "dir" {
				return fmt.Errorf("TOC directory %q: %q links to a directory", te.Name, k.name)
			}
			b.ix.entries[m].nlink++ // another name of a hard-linked file
			b.linked[m] = kte.Name
			numbers[i] = m
			continue
		}
		numbers[i] = b.add(entry{nlink: 1})
		if b.seen != nil {
			b.seen[k.k] = numbers[i]
		}
		fills = append(fills, i)
	}
	b.ix.children = append(b.ix.children, numbers...)
	for _, k := range kids {
		b.ix.names = append(b.ix.names, strings.Clone(k.name))
	}
	d := &b.ix.entries[n]
	d.first, d.count = first, uint32(len(numbers))

	subdirs := uint32(0)
	for _, i := range fills {
		if err := b.fill(numbers[i], kids[i].k); err != nil {
			return err
		}
		if b.r.entry(kids[i].k).Type == "dir" {
			subdirs++
		}
	}
	b.ix.entries[n].nlink = 2 + subdirs
	return nil
}

func (b *builder[K]) add(e entry) uint32 {
	b.ix.entries = append(b.ix.entries, e)
	return uint32(len(b.ix.entries) - 1)
}

// fileChunks records the chunks of regular file te in e.
func (b *builder[K]) fileChunks(e *entry, te *tocEntry) error {
	e.first = uint32(len(b.ix.chunks))
	if te.Size == 0 {
		return nil
	}
	for off := int64(0); off < te.Size; {
		ce, ok := b.r.chunkAt(te.Name, off)
		if !ok || ce.ChunkOffset != off || ce.ChunkSize <= 0 {
			return fmt.Errorf("TOC entry %q: no chunk at offset %d", te.Name, off)
		}
		if !ce.chunkDigest.ok {
			return fmt.Errorf("TOC entry %q: chunk at offset %d: digest %q: want sha256", te.Name, off, ce.chunkDigest)
		}
		end := ce.End
		if ce.Offset <= 0 || end <= ce.Offset || ce.InnerOffset < 0 {
			return fmt.Errorf("TOC entry %q: chunk at offset %d: bad blob range %d-%d", te.Name, off, ce.Offset, end)
		}
		c := chunk{offset: ce.Offset, end: end, inner: ce.InnerOffset, fileOff: off, size: ce.ChunkSize,
			digest: ce.chunkDigest.sha256}
		b.ix.chunks = append(b.ix.chunks, c)
		off += ce.ChunkSize
	}
	e.count = uint32(len(b.ix.chunks)) - e.first
	return nil
}

// modeBits returns the setuid, setgid and sticky bits of a tar mode.
func modeBits(tarMode uint32) uint32 {
	var m uint32
	if tarMode&04000 != 0 {
		m |= syscall.S_ISUID
	}
	if tarMode&02000 != 0 {
		m |= syscall.S_ISGID
	}
	if tarMode&01000 != 0 {
		m |= syscall.S_ISVTX
	}
	return m
}

// unixNano is t in nanoseconds since the epoch; a TOC without a time (or
// with the epoch, which eStargz writes as none) gives 0.
func unixNano(t time.Time) int64 {
	if t.IsZero() || t.Before(time.Unix(0, 0)) {
		return 0
	}
	return t.UnixNano()
}

// mtime is te's mtime in ns, from the exact record when it has one.
func (b *builder[K]) mtime(te *tocEntry) int64 {
	if x := b.exact[te.Name]; x != nil && x.mtime != 0 {
		return x.mtime
	}
	return unixNano(te.ModTime)
}

// imageXattrs returns the attributes of xa an extraction sets (see
// meta.KeepXattr): overlay's own and trusted.*, which would make overlay
// follow a redirect or hide lower layers, are dropped, and so are user.*
// ones unless userOK (Linux allows them on regular files and directories
// only; containerd's applier skips them elsewhere).
func imageXattrs(xa map[string][]byte, userOK bool) map[string][]byte {
	keep := func(k string) bool {
		return meta.KeepXattr(k) && (userOK || !strings.HasPrefix(k, "user."))
	}
	for k := range xa {
		if !keep(k) {
			out := map[string][]byte{}
			for k, v := range xa {
				if keep(k) {
					out[k] = v
				}
			}
			return out
		}
	}
	return xa
}
