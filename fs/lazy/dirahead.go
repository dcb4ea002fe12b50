package lazy

import (
	"context"
	"syscall"
	"time"

	"github.com/containerd/log"
)

// Directory read-ahead. The files of one directory are often read one
// after the other: a program's modules (python reads the compiled modules
// of its standard library from one __pycache__ directory), a library's
// parts, a locale's categories. Without an access profile each of those
// reads costs a round trip, one after the other. Once lazy reads of a
// mount have missed the chunk cache for dirAheadMisses files of one
// directory, the layer fetches that directory's other small files in the
// background, a few requests at once, through the verified path into the
// chunk cache, as a replay does. Their bytes are kept for population like
// any fetched bytes, so they are not fetched twice. Layers told to fetch
// only what reads need (Options.MinRequest <= 0) do not read ahead.
const (
	dirAheadMisses = 3         // files of a directory missed before the rest is fetched
	dirAheadFile   = 256 << 10 // larger files are left to their own reads
	dirAheadBytes  = 4 << 20   // of the blob, at most, one directory's read-ahead spans
	dirAheadQueue  = 16        // directories waiting; more are not read ahead
)

// dirAheadReq is a directory to read ahead: its entry and its path.
type dirAheadReq struct {
	num  uint32
	path string
}

// dirAheadDone marks, in rawFS.dirMisses, a directory already read ahead.
const dirAheadDone = ^uint8(0)

// noteRead is called before a read at offset 0 of regular file num (how
// a file's reading starts): if the file's bytes are not all cached, it counts a miss for its directory and
// queues the directory for read-ahead at its dirAheadMisses-th miss.
func (r *rawFS) noteRead(num uint32) {
	l := r.l
	if l.f.minSpan <= 0 || r.ahead == nil || l.complete.Load() {
		return
	}
	r.mu.Lock()
	dir, ok := r.parents[num]
	missed := r.dirMisses[dir]
	r.mu.Unlock()
	if !ok || missed == dirAheadDone || l.f.cachedFile(l.ix.fileChunks(&l.ix.entries[num])) {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dirMisses[dir] == dirAheadDone {
		return
	}
	r.dirMisses[dir]++
	if r.dirMisses[dir] < dirAheadMisses {
		return
	}
	r.dirMisses[dir] = dirAheadDone
	select {
	case r.ahead <- dirAheadReq{dir, r.paths[dir]}:
		l.dirsAhead.Add(1)
	default: // a burst of directories: the rest load on demand
	}
}

// cachedFile reports whether every chunk of cs (a file's, or a read's) is
// in the chunk cache.
func (f *fetcher) cachedFile(cs []chunk) bool {
	for k := range cs {
		if !f.cache.Has(cs[k].dgst()) {
			return false
		}
	}
	return true
}

// readDirsAhead reads ahead the directories queued on ch until ctx ends.
func (l *Layer) readDirsAhead(ctx context.Context, ch <-chan dirAheadReq) {
	for {
		select {
		case <-ctx.Done():
			return
		case d := <-ch:
			l.readDirAhead(ctx, d.num, d.path)
		}
	}
}

// readDirAhead fetches the small files of directory dir that are not
// cached, in name order, as far as dirAheadBytes of the blob.
func (l *Layer) readDirAhead(ctx context.Context, dir uint32, path string) {
	if l.complete.Load() {
		return
	}
	var files []uint32
	var spanned int64
	for _, k := range l.ix.dirChildren(&l.ix.entries[dir]) {
		e := &l.ix.entries[k]
		if e.mode&syscall.S_IFMT != syscall.S_IFREG || e.size == 0 || e.size > dirAheadFile {
			continue
		}
		cs := l.ix.fileChunks(e)
		if len(cs) == 0 || l.f.cachedFile(cs) {
			continue
		}
		lo, hi := cs[0].offset, cs[0].end
		for _, c := range cs {
			lo, hi = min(lo, c.offset), max(hi, c.end)
		}
		if spanned+hi-lo > dirAheadBytes {
			break
		}
		spanned += hi - lo
		files = append(files, k)
	}
	groups := l.f.replayPlan(l.ix, files)
	if len(groups) == 0 {
		return
	}
	start := time.Now()
	entry := log.G(ctx).WithFields(log.Fields{"layer": l.desc.Digest, "directory": "/" + path})
	if err := l.f.fetchGroups(ctx, groups); err != nil {
		if ctx.Err() == nil {
			entry.WithError(err).Debug("directory read-ahead failed; its files load on demand")
		}
		return
	}
	entry.WithFields(log.Fields{
		"files": len(files), "requests": len(groups), "bytes": spanned,
		"elapsed": time.Since(start).Round(time.Millisecond),
	}).Debug("directory read ahead")
}
