package lazy

import (
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// linkAttrs are the attributes a hard-linked inode ends up with.
type linkAttrs struct {
	mode     uint32 // permission, setuid, setgid and sticky bits
	uid, gid uint32
	mtime    time.Time
	xattrs   map[string][]byte
}

// hardlinkAttrs reads the TOC in tar order and returns, for every file
// that has hard links, the attributes containerd's applier leaves on it:
// each hard link's header sets owner, mode and mtime of the shared inode
// again and adds its xattrs, so the last header wins. estargz's reader
// shows the first header's; real images rarely differ, malicious or
// hand-made ones may.
func hardlinkAttrs(dec estargz.Decompressor, blob io.ReaderAt, size int64) (map[string]*linkAttrs, error) {
	toc, err := readTOC(dec, blob, size)
	if err != nil {
		return nil, err
	}
	return linkAttrsOf(len(toc.Entries), func(i int) *tocEntry {
		e := toc.Entries[i]
		te := &tocEntry{Name: clean(e.Name), Type: e.Type, LinkName: e.LinkName, Mode: uint32(e.Mode & 0o7777),
			UID: uint32(e.UID), GID: uint32(e.GID), Xattrs: e.Xattrs}
		te.ModTime, _ = time.Parse(time.RFC3339, e.ModTime3339)
		return te
	}), nil
}

// linkAttrsOf is hardlinkAttrs of the n TOC entries at returns, in tar
// order (names clean, link names as in the TOC).
func linkAttrsOf(n int, at func(i int) *tocEntry) map[string]*linkAttrs {
	targets := map[string]bool{}
	for i := range n {
		if e := at(i); e.Type == "hardlink" {
			targets[clean(e.LinkName)] = true
		}
	}
	if len(targets) == 0 {
		return nil
	}
	out := map[string]*linkAttrs{}
	alias := map[string]string{} // hard link name → the inode's first name
	for i := range n {
		e := at(i)
		switch {
		case e.Type == "hardlink":
			first := clean(e.LinkName)
			if a, ok := alias[first]; ok {
				first = a
			}
			alias[e.Name] = first
			a, ok := out[first]
			if !ok {
				continue // links to a name that is not a file; buildIndex reports it
			}
			a.mode, a.uid, a.gid, a.mtime = e.Mode, e.UID, e.GID, e.ModTime
			for k, v := range e.Xattrs {
				a.xattrs[k] = v
			}
		case targets[e.Name] && e.Type != "chunk":
			a := &linkAttrs{mode: e.Mode, uid: e.UID, gid: e.GID, mtime: e.ModTime, xattrs: map[string][]byte{}}
			for k, v := range e.Xattrs {
				a.xattrs[k] = v
			}
			out[e.Name] = a
		}
	}
	return out
}

// readTOC parses the TOC again in its original order.
func readTOC(dec estargz.Decompressor, blob io.ReaderAt, size int64) (*estargz.JTOC, error) {
	fsize := dec.FooterSize()
	if size < fsize {
		return nil, fmt.Errorf("blob of %d bytes has no footer", size)
	}
	footer := make([]byte, fsize)
	if _, err := blob.ReadAt(footer, size-fsize); err != nil {
		return nil, fmt.Errorf("read footer: %w", err)
	}
	_, tocOff, tocSize, err := dec.ParseFooter(footer)
	if err != nil {
		return nil, fmt.Errorf("parse footer: %w", err)
	}
	if tocSize <= 0 {
		tocSize = size - tocOff - fsize
	}
	if tocOff < 0 || tocSize <= 0 || tocOff+tocSize > size {
		return nil, fmt.Errorf("TOC at %d+%d is outside the blob", tocOff, tocSize)
	}
	toc, _, err := dec.ParseTOC(io.NewSectionReader(blob, tocOff, tocSize))
	if err != nil {
		return nil, fmt.Errorf("parse TOC: %w", err)
	}
	return toc, nil
}

// clean is name as a path from the layer's root, without a leading "/"
// and never above the root. A name that is so already is returned as it
// is, not copied: a tocTree keeps one per entry.
func clean(name string) string {
	if path.Clean(name) == name && !strings.HasPrefix(name, "/") && name != "." && name != ".." && !strings.HasPrefix(name, "../") {
		return name
	}
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}
