package lazy

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// A TOC's entries are a list in tar order; the index wants a tree. estargz
// builds one (its Reader) of its own decoded entries, a child map per
// directory and lookup tables: 480 bytes per entry of a layer of 50,000
// small files, alive next to the index being built. tocTree is that tree
// as buildIndex needs it, built from the entries as they are decoded from
// the stream, each kept as a tocEntry of what the index reads (294 bytes
// per entry of that layer: see BenchmarkOpenPeakHeap); it resolves names,
// implicit directories, hard links, chunks and the end of each compressed
// stream as estargz's Reader does, so that the index is the same
// (TestTreeIndex, FuzzOpen).

// tocEntry is what the index reads of a TOC entry: a tocTree keeps one
// per entry while the index is built, so it is kept small (200 bytes).
type tocEntry struct {
	Name, Type, LinkName string
	Mode                 uint32 // the tar mode's permission, setuid, setgid and sticky bits
	UID, GID             uint32 // as the index keeps them
	DevMajor, DevMinor   uint32
	Size                 int64
	ModTime              time.Time
	Xattrs               map[string][]byte

	// Regular files and their chunks: the chunk at ChunkOffset in the
	// file, of ChunkSize bytes, starts InnerOffset bytes into the
	// compressed stream at Offset, which ends at End.
	Offset, InnerOffset, ChunkOffset, ChunkSize, End int64
	chunkDigest                                      tocDigest
}

// tocDigest is a TOC entry's chunkDigest: a sha256 as its 32 bytes (as a
// "sha256:..." string it would take 96), any other as its string, which
// buildIndex refuses.
type tocDigest struct {
	sha256 [32]byte
	ok     bool    // sha256 holds the digest
	other  *string // the digest as the TOC says it, when not a sha256 (nil when empty)
}

func parseTOCDigest(s string) tocDigest {
	var d tocDigest
	if h, ok := strings.CutPrefix(s, "sha256:"); ok && len(h) == 2*len(d.sha256) {
		var enc [64]byte // not []byte(h): that allocates
		copy(enc[:], h)
		if _, err := hex.Decode(d.sha256[:], enc[:]); err == nil {
			d.ok = true
			return d
		}
	}
	if s != "" {
		other := s // declared here, so that only this case allocates
		d.other = &other
	}
	return d
}

// String is the digest as the TOC says it.
func (d tocDigest) String() string {
	switch {
	case d.ok:
		return "sha256:" + hex.EncodeToString(d.sha256[:])
	case d.other != nil:
		return *d.other
	}
	return ""
}

// newTOCEntry is te as a tocEntry, its name cleaned; chunks' names and
// sizes, mtimes and ends are left to the caller.
func newTOCEntry(te *estargz.TOCEntry) tocEntry {
	return tocEntry{Name: clean(te.Name), Type: te.Type, LinkName: te.LinkName, Mode: uint32(te.Mode & 0o7777),
		UID: uint32(te.UID), GID: uint32(te.GID), Size: te.Size, DevMajor: uint32(te.DevMajor), DevMinor: uint32(te.DevMinor),
		Xattrs: te.Xattrs, Offset: te.Offset, InnerOffset: te.InnerOffset, ChunkOffset: te.ChunkOffset,
		ChunkSize: te.ChunkSize, chunkDigest: parseTOCDigest(te.ChunkDigest)}
}

// tocSource is a TOC's tree: estargz's Reader or a tocTree. K identifies
// an entry; hard links of a file give the same K.
type tocSource[K comparable] interface {
	lookup(name string) (K, bool)
	entry(k K) *tocEntry
	forEachChild(k K, f func(base string, c K) bool)
	// chunkAt returns the chunk of the regular file name that holds
	// byte off.
	chunkAt(name string, off int64) (*tocEntry, bool)
	// readFile returns the first size bytes of the regular file name.
	readFile(name string, size int64) ([]byte, error)
	// sizes says how large the index of the tree may get.
	sizes() treeSizes
}

// treeSizes bounds the lists of an index built from a tree; links says
// whether an entry may be reached by more than one name (hard links).
// Zeros say nothing: the lists grow as needed.
type treeSizes struct {
	entries, chunks, children int
	links                     bool
}

// readerSource is estargz's Reader as a tocSource.
type readerSource struct{ r *estargz.Reader }

func (s readerSource) lookup(name string) (*estargz.TOCEntry, bool) { return s.r.Lookup(name) }

func (s readerSource) entry(te *estargz.TOCEntry) *tocEntry {
	e := newTOCEntry(te)
	e.Name, e.ModTime, e.End = te.Name, te.ModTime(), te.NextOffset()
	return &e
}

func (s readerSource) sizes() treeSizes { return treeSizes{links: true} }

func (s readerSource) forEachChild(te *estargz.TOCEntry, f func(string, *estargz.TOCEntry) bool) {
	te.ForeachChild(f)
}

func (s readerSource) chunkAt(name string, off int64) (*tocEntry, bool) {
	ce, ok := s.r.ChunkEntryForOffset(name, off)
	if !ok {
		return nil, false
	}
	return s.entry(ce), true
}

func (s readerSource) readFile(name string, size int64) ([]byte, error) {
	sr, err := s.r.OpenFile(name)
	if err != nil {
		return nil, err
	}
	b := make([]byte, size)
	if _, err := sr.ReadAt(b, 0); err != nil && err != io.EOF {
		return nil, err
	}
	return b, nil
}

// tocTree is a TOC's tree built from its entries one at a time (add), then
// finished. Entries are numbered in TOC order; implicit directories follow.
type tocTree struct {
	nodes  [][]tocEntry         // in blocks: see push
	n      uint32               // entries in nodes
	kids   []treeKid            // children of every directory, by directory (after finish)
	first  map[uint32][2]uint32 // directory → its range in kids
	m      map[string]uint32    // entries by name (not chunks); the last of a name wins
	chunks map[string][]uint32

	lastPath string
	lastReg  int // -1 before the first regular file
	pending  []uint32
	added    uint32 // entries added from the TOC, before implicit directories (after finish)
	nChunks  int    // "chunk" entries added
	nRegs    int    // "reg" entries added
	hasLinks bool   // a "hardlink" entry was added
	ra       io.ReaderAt
	dec      estargz.Decompressor
}

// hardlinkAttrs is hardlinkAttrs of the TOC the tree was built from, from
// its entries as added, without reading the TOC again.
func (t *tocTree) hardlinkAttrs() map[string]*linkAttrs {
	return linkAttrsOf(int(t.added), func(i int) *tocEntry { return t.entry(uint32(i)) })
}

type treeKid struct {
	dir, n uint32
	base   string
}

func newTOCTree(ra io.ReaderAt, dec estargz.Decompressor) *tocTree {
	return &tocTree{m: map[string]uint32{}, chunks: map[string][]uint32{}, lastReg: -1, ra: ra, dec: dec}
}

// add adds the next TOC entry.
func (t *tocTree) add(te *estargz.TOCEntry) error {
	if t.n >= 1<<32-1<<20 {
		return fmt.Errorf("TOC has too many entries")
	}
	i := t.n
	e := newTOCEntry(te)
	// A compressed stream ends where the next one starts.
	if e.Offset != 0 && e.InnerOffset == 0 {
		for _, p := range t.pending {
			t.entry(p).End = e.Offset
		}
		t.pending = t.pending[:0]
	}
	switch e.Type {
	case "reg":
		t.lastReg = int(i)
		t.nRegs++
	case "chunk":
		t.nChunks++
	case "hardlink":
		t.hasLinks = true
	}
	if e.Type == "chunk" {
		e.Name = t.lastPath
		t.chunks[e.Name] = append(t.chunks[e.Name], i)
		if e.ChunkSize == 0 && t.lastReg >= 0 {
			e.ChunkSize = t.entry(uint32(t.lastReg)).Size - e.ChunkOffset
		}
	} else {
		t.lastPath = e.Name
		e.ModTime, _ = time.Parse(time.RFC3339, te.ModTime3339)
		t.m[e.Name] = i
	}
	if e.Type == "reg" && e.ChunkSize > 0 && e.ChunkSize < e.Size {
		t.chunks[e.Name] = []uint32{i}
	}
	if e.ChunkSize == 0 && e.Size != 0 {
		e.ChunkSize = e.Size
	}
	t.push(e)
	if e.Type == "reg" || e.Type == "chunk" {
		t.pending = append(t.pending, i)
	}
	return nil
}

// finish links the entries added into a tree; end is where the last
// compressed stream ends.
func (t *tocTree) finish(end int64) error {
	for _, p := range t.pending {
		t.entry(p).End = end
	}
	t.pending = nil
	n0 := t.n
	t.added = n0
	t.kids = make([]treeKid, 0, int(n0)-t.nChunks+16) // implicit directories may add a few more
	for i := uint32(0); i < n0; i++ {
		if t.entry(i).Type == "chunk" {
			continue
		}
		name := t.entry(i).Name
		pdir := parentDir(name)
		if name == pdir {
			continue // the root
		}
		d := t.dir(pdir)
		c := i
		if t.entry(i).Type == "hardlink" {
			var err error
			if c, err = t.source(i); err != nil {
				return err
			}
		}
		t.kids = append(t.kids, treeKid{dir: d, n: c, base: path.Base(name)})
	}
	if len(t.m) == 0 {
		t.m[""] = t.implicitDir("")
	}
	// A directory's children by name; of two of the same name, the one
	// added last.
	sort.SliceStable(t.kids, func(i, j int) bool {
		a, b := &t.kids[i], &t.kids[j]
		if a.dir != b.dir {
			return a.dir < b.dir
		}
		return a.base < b.base
	})
	w := 0
	for i := range t.kids {
		if i+1 < len(t.kids) && t.kids[i+1].dir == t.kids[i].dir && t.kids[i+1].base == t.kids[i].base {
			continue
		}
		t.kids[w] = t.kids[i]
		w++
	}
	t.kids = t.kids[:w:w]
	t.first = map[uint32][2]uint32{}
	for i := 0; i < len(t.kids); {
		j := i
		for j < len(t.kids) && t.kids[j].dir == t.kids[i].dir {
			j++
		}
		t.first[t.kids[i].dir] = [2]uint32{uint32(i), uint32(j)}
		i = j
	}
	return nil
}

func parentDir(p string) string {
	dir, _ := path.Split(p)
	return strings.TrimSuffix(dir, "/")
}

func (t *tocTree) implicitDir(name string) uint32 {
	t.push(tocEntry{Name: name, Type: "dir", Mode: 0o755})
	return t.n - 1
}

// dir returns the directory name, creating it and its parents when the
// TOC has no entry of that name.
func (t *tocTree) dir(name string) uint32 {
	if n, ok := t.m[name]; ok {
		return n
	}
	// Iteratively: a TOC can name a file a million directories deep.
	var missing []string
	for d := name; ; d = parentDir(d) {
		if _, ok := t.m[d]; ok {
			break
		}
		missing = append(missing, d)
		if d == "" {
			break
		}
	}
	for i := len(missing) - 1; i >= 0; i-- {
		d := missing[i]
		n := t.implicitDir(d)
		t.m[d] = n
		if d != "" {
			t.kids = append(t.kids, treeKid{dir: t.m[parentDir(d)], n: n, base: path.Base(d)})
		}
	}
	return t.m[name]
}

// source resolves hard link n to the entry it links to.
func (t *tocTree) source(n uint32) (uint32, error) {
	visited := map[string]bool{}
	for t.entry(n).Type == "hardlink" {
		target := clean(t.entry(n).LinkName)
		if visited[target] {
			return 0, fmt.Errorf("cyclic hardlink detected")
		}
		visited[target] = true
		org, ok := t.m[target]
		if !ok {
			return 0, fmt.Errorf("%q is a hardlink but the linkname %q isn't found", t.entry(n).Name, t.entry(n).LinkName)
		}
		n = org
	}
	return n, nil
}

// sizes: an index has at most an entry per TOC entry that is not a chunk
// (and its root), a chunk per regular file and "chunk" entry, and a child
// per kid.
func (t *tocTree) sizes() treeSizes {
	return treeSizes{entries: int(t.n) - t.nChunks + 1, chunks: t.nRegs + t.nChunks, children: len(t.kids), links: t.hasLinks}
}

func (t *tocTree) lookup(name string) (uint32, bool) {
	n, ok := t.m[clean(name)]
	return n, ok
}

func (t *tocTree) entry(n uint32) *tocEntry { return &t.nodes[n/treeBlock][n%treeBlock] }

// push adds e as entry t.n. Entries are kept in blocks of treeBlock, so
// that adding one never copies the others.
func (t *tocTree) push(e tocEntry) {
	if t.n%treeBlock == 0 {
		t.nodes = append(t.nodes, make([]tocEntry, 0, treeBlock))
	}
	b := &t.nodes[len(t.nodes)-1]
	*b = append(*b, e)
	t.n++
}

const treeBlock = 1024

func (t *tocTree) forEachChild(n uint32, f func(string, uint32) bool) {
	r, ok := t.first[n]
	if !ok {
		return
	}
	for _, k := range t.kids[r[0]:r[1]] {
		if !f(k.base, k.n) {
			return
		}
	}
}

func (t *tocTree) chunkAt(name string, off int64) (*tocEntry, bool) {
	name = clean(name)
	n, ok := t.m[name]
	if !ok || (t.entry(n).Type != "reg" && t.entry(n).Type != "chunk") {
		return nil, false
	}
	ents := t.chunks[name]
	if len(ents) < 2 {
		if off >= t.entry(n).ChunkSize {
			return nil, false
		}
		return t.entry(n), true
	}
	i := sort.Search(len(ents), func(i int) bool {
		e := t.entry(ents[i])
		return e.ChunkOffset >= off || (off > e.ChunkOffset && off < e.ChunkOffset+e.ChunkSize)
	})
	if i == len(ents) {
		return nil, false
	}
	return t.entry(ents[i]), true
}

func (t *tocTree) readFile(name string, size int64) ([]byte, error) {
	var out bytes.Buffer
	for off := int64(0); off < size; {
		c, ok := t.chunkAt(name, off)
		if !ok || c.ChunkOffset != off || c.ChunkSize <= 0 || c.End <= c.Offset || c.InnerOffset < 0 {
			return nil, fmt.Errorf("%s: no chunk at offset %d", name, off)
		}
		zr, err := t.dec.Reader(io.NewSectionReader(t.ra, c.Offset, c.End-c.Offset))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		_, err = io.CopyN(io.Discard, zr, c.InnerOffset)
		if err == nil {
			_, err = io.CopyN(&out, zr, min(c.ChunkSize, size-off))
		}
		zr.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		off += c.ChunkSize
	}
	return out.Bytes(), nil
}
