package lazy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/cache"
	"github.com/lazylayer/lazylayer/fs/fusefd"
)

// TOCDigestAnnotation is the layer annotation holding the digest of the
// layer's TOC, set by eStargz and zstd:chunked converters.
const TOCDigestAnnotation = "containerd.io/snapshot/stargz/toc.digest"

// ErrTOCMismatch is wrapped when a TOC does not have the digest the image
// manifest gave for it: the layer must not be served lazily.
var ErrTOCMismatch = errors.New("TOC does not match its digest")

// Options tune a lazy layer.
type Options struct {
	// Cache holds verified chunks. Required.
	Cache *cache.Store
	// ReadTimeout is how long a read waits while the registry sends the
	// layer nothing (default 30s): once no byte has arrived for this
	// long, retries and remote's own request timeouts included, the read
	// fails with EIO. A read whose bytes keep arriving is not cut short,
	// however slow the link. The kernel follows a failed read-ahead with
	// a read of its own for the same bytes: reads of the chunks of a read
	// that timed out fail at once for a second after it.
	ReadTimeout time.Duration
	// MaxRequest bounds one merged ranged request (default 16 MiB).
	MaxRequest int64
	// MinRequest is how much of the blob an on-demand request covers at
	// least: the chunks that follow the ones a read needs come along
	// (default 64 KiB; negative: only what the read needs). On a link
	// with real latency a few more bytes cost less than another round
	// trip: requests grow beyond it to the link's bandwidth-delay product
	// as measured (up to maxReach), and a file of a few chunks is fetched
	// whole (see fetcher.plan).
	MinRequest int64
	// BlobPath, if set, is where the layer keeps its local copy of the
	// blob for population (and a list of the ranges it holds beside it).
	BlobPath string
	// Passthrough opens files with FUSE passthrough once the layer is
	// local. Set it only where PassthroughSupport says yes.
	Passthrough bool
	// Activity, shared by all layers, lets every layer's population yield
	// to on-demand reads of any layer; nil gives the layer its own.
	Activity *Activity
	// Metrics, if set, receives what the layer does.
	Metrics Metrics
	// Handover, if set, keeps the layer's FUSE connection for the next
	// daemon, and gives back one the last daemon served at the same
	// mountpoint.
	Handover Handover
	// ProfileDir, if set, is a directory of access profiles (see Profile,
	// one file per layer named ProfileName): when it holds the layer's,
	// the files it names are fetched right after the mount.
	ProfileDir string
}

// Handover keeps FUSE connections while the daemon restarts or after it
// crashed (a fusefd.Client, or a fusefd.Store under systemd).
type Handover interface {
	// Holds reports whether a connection is kept for mountpoint.
	Holds(mountpoint string) bool
	// Take returns the connection kept for mountpoint, once.
	Take(mountpoint string) (fusefd.Held, bool)
	// Keep keeps a copy of c, served at mountpoint, with note.
	Keep(mountpoint string, c *fusefd.Conn, note []byte) error
	// SetState records the server's state with the connection kept
	// for mountpoint.
	SetState(mountpoint string, state []byte) error
	// Drop closes the copy kept for mountpoint.
	Drop(mountpoint string) error
}

// Capable reports whether desc is a layer lazylayer can serve lazily: an
// eStargz or zstd:chunked layer whose TOC digest the manifest records.
func Capable(desc ocispec.Descriptor) (digest.Digest, bool) {
	d, err := digest.Parse(desc.Annotations[TOCDigestAnnotation])
	if err != nil {
		return "", false
	}
	switch desc.MediaType {
	case ocispec.MediaTypeImageLayerGzip, "application/vnd.docker.image.rootfs.diff.tar.gzip", ocispec.MediaTypeImageLayerZstd:
		return d, true
	}
	return "", false
}

// Layer is a layer served lazily over FUSE from its TOC.
type Layer struct {
	desc      ocispec.Descriptor
	tocDigest digest.Digest
	profile   []uint32 // files of the access profile to replay at Mount, in first-open order
	ix        *index
	f         *fetcher
	tocMu     sync.Mutex
	toc       *Recorded // footer and TOC bytes as read, until SaveTOC; guarded by tocMu

	reads        atomic.Int64           // FUSE read requests served
	fuseRequests atomic.Int64           // FUSE requests of every kind answered
	bound        atomic.Int64           // regular files the kernel holds looked up (data mounts)
	popFetched   atomic.Int64           // bytes population fetched
	popStart     atomic.Int64           // when population started, unix ns
	local        atomic.Pointer[string] // where verified files are, once there is a place
	complete     atomic.Bool            // local holds the complete tree
	passthrough  bool
	// noPassthrough is set once the kernel refused a backing file.
	noPassthrough atomic.Bool
	handover      Handover

	mu         sync.Mutex
	server     *fuse.Server       // guarded by mu
	raw        *rawFS             // what server serves; guarded by mu
	conn       *fusefd.Conn       // the mount's FUSE connection; guarded by mu
	resumed    bool               // the connection was taken over from an earlier daemon; guarded by mu
	mountpoint string             // guarded by mu
	cancel     context.CancelFunc // stops the prefetch of the last Mount; guarded by mu
	prefetched chan struct{}      // closed when that prefetch has returned; guarded by mu
	aheadDone  chan struct{}      // closed when the last Mount's directory read-ahead has stopped; guarded by mu
	dirsAhead  atomic.Int64       // directories queued for read-ahead (dirahead.go)

	accessMu sync.Mutex
	accessed []string        // files opened while lazy, in first-open order; guarded by accessMu
	opened   map[uint32]bool // entries in accessed; guarded by accessMu
}

// maxAccessed bounds the list of files recorded as opened.
const maxAccessed = 100000

// recordOpen notes that file num (at path) was opened while the layer is
// lazy, for a prefetch list.
func (l *Layer) recordOpen(num uint32, path string) {
	if l.complete.Load() {
		return
	}
	l.accessMu.Lock()
	defer l.accessMu.Unlock()
	if l.opened == nil {
		l.opened = map[uint32]bool{}
	}
	if l.opened[num] || len(l.accessed) >= maxAccessed {
		return
	}
	l.opened[num] = true
	l.accessed = append(l.accessed, path)
}

// Accessed lists the files opened while the layer was lazy, in the order
// they were first opened: the prioritized files for `lazylayer convert
// --prioritize`.
func (l *Layer) Accessed() []string {
	l.accessMu.Lock()
	defer l.accessMu.Unlock()
	return slices.Clone(l.accessed)
}

// Open reads the footer and TOC of the layer desc through ra (normally the
// registry blob, or a Recorded copy after a restart), checks the TOC against
// tocDigest and indexes it. Chunks are later fetched from blob.
func Open(ctx context.Context, ra io.ReaderAt, blob Blob, desc ocispec.Descriptor, tocDigest digest.Digest, o Options) (*Layer, error) {
	if o.Cache == nil {
		return nil, errors.New("lazy layer: no chunk cache")
	}
	if o.ReadTimeout <= 0 {
		o.ReadTimeout = 30 * time.Second
	}
	if o.MaxRequest <= 0 {
		o.MaxRequest = 16 << 20
	}
	if o.MinRequest == 0 {
		o.MinRequest = 64 << 10
	}
	if o.Activity == nil {
		o.Activity = new(Activity)
	}
	if o.Metrics == nil {
		o.Metrics = noMetrics{}
	}
	rec, ix, dec, err := openTOC(ra, desc, tocDigest)
	if err != nil {
		return nil, err
	}
	var partial *partialBlob
	if o.BlobPath != "" {
		if partial, err = openPartial(o.BlobPath, desc.Size); err != nil {
			return nil, fmt.Errorf("layer %s: local blob copy: %w", desc.Digest, err)
		}
	}
	l := &Layer{
		desc:        desc,
		tocDigest:   tocDigest,
		ix:          ix,
		toc:         rec,
		passthrough: o.Passthrough,
		handover:    o.Handover,
		f: &fetcher{
			layer:   desc.Digest,
			blob:    blob,
			cache:   o.Cache,
			dec:     dec,
			timeout: o.ReadTimeout,
			maxSpan: o.MaxRequest,
			minSpan: o.MinRequest,
			partial: partial,
			ix:      ix,
			act:     o.Activity,
			metrics: o.Metrics,
		},
	}
	l.f.startBackground()
	if ix.view != ViewExact {
		log.G(ctx).WithField("layer", desc.Digest).Info("lazy view is " + ix.view)
	}
	// The footer and TOC are part of the blob: population need not fetch
	// them again.
	for _, rg := range rec.ranges {
		l.f.keep(ctx, rg.b, rg.off)
	}
	if o.ProfileDir != "" {
		l.loadProfile(ctx, o.ProfileDir)
	}
	return l, nil
}

// ReadTOC reads the footer and TOC of the layer desc through ra and checks
// them as Open does, and returns the bytes it read: Open can then run on
// them without the registry. The Manager reads the TOCs of an image's
// other layers this way while containerd prepares the first.
func ReadTOC(ra io.ReaderAt, desc ocispec.Descriptor, tocDigest digest.Digest) (*Recorded, error) {
	if desc.MediaType != ocispec.MediaTypeImageLayerZstd {
		// Record and check the bytes Open reads, decoding nothing:
		// a layer's index is built once, by Open.
		rec := &Recorded{src: ra}
		if off, _, ok := exactOffset(desc); ok {
			_ = readTail(rec, off, desc.Size) // as openTOC: the record is optional
		}
		got, err := streamedTOCDigest(rec, desc.Size, new(estargz.GzipDecompressor))
		if err == nil {
			rec.src = nil
			if got != tocDigest {
				return nil, fmt.Errorf("layer %s: TOC has digest %s, the manifest says %s: %w", desc.Digest, got, tocDigest, ErrTOCMismatch)
			}
			return rec, nil
		}
		if !errors.Is(err, errNotStreamed) {
			return nil, fmt.Errorf("layer %s: read TOC: %w", desc.Digest, err)
		}
	}
	rec, _, _, err := openTOC(ra, desc, tocDigest)
	return rec, err
}

// openTOC reads, checks and indexes the footer and TOC of desc through ra,
// recording what it read.
func openTOC(ra io.ReaderAt, desc ocispec.Descriptor, tocDigest digest.Digest) (*Recorded, *index, estargz.Decompressor, error) {
	var (
		dec  estargz.Decompressor = new(gzipDecompressor)
		opts []estargz.OpenOption
	)
	if desc.MediaType == ocispec.MediaTypeImageLayerZstd {
		dec = new(zstdchunked.Decompressor)
		opts = append(opts, estargz.WithDecompressors(dec))
	}
	// A record complete already (ReadTOC's, or a saved one) serves as it
	// is: recording it again would hold a second copy of the TOC.
	rec, ok := ra.(*Recorded)
	if !ok || !rec.complete() {
		rec = &Recorded{src: ra}
	}
	exactOff, exactDigest, hasExact := exactOffset(desc)
	var exactErr error
	if hasExact {
		// Record, TOC and footer in one request.
		exactErr = readTail(rec, exactOff, desc.Size)
	}
	var (
		tree *tocTree
		r    *estargz.Reader
		dgst digest.Digest
		err  = errNotStreamed
	)
	if len(opts) == 0 {
		// A gzip eStargz: its TOC is decoded as a stream into a tree of
		// what the index needs, not into estargz's Reader.
		tree, dgst, err = openTree(rec, desc.Size, dec)
	}
	if errors.Is(err, errNotStreamed) {
		if r, err = estargz.Open(io.NewSectionReader(rec, 0, desc.Size), opts...); err == nil {
			dgst = r.TOCDigest()
		}
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s: read TOC: %w", desc.Digest, err)
	}
	if dgst != tocDigest {
		return nil, nil, nil, fmt.Errorf("layer %s: TOC has digest %s, the manifest says %s: %w", desc.Digest, dgst, tocDigest, ErrTOCMismatch)
	}
	var ix *index
	if tree != nil {
		ix, err = indexTOC[uint32](tree, desc, exactOff, exactDigest, hasExact, exactErr, dec, rec)
	} else {
		ix, err = indexTOC[*estargz.TOCEntry](readerSource{r}, desc, exactOff, exactDigest, hasExact, exactErr, dec, rec)
	}
	if err != nil {
		return nil, nil, nil, err
	}
	rec.src = nil
	return rec, ix, dec, nil
}

// indexTOC builds the index of the layer desc from its TOC's tree r, with
// its exact record when it has one (at exactOff, of exactDigest; exactErr
// says why it could not be read).
func indexTOC[K comparable](r tocSource[K], desc ocispec.Descriptor, exactOff int64, exactDigest digest.Digest, hasExact bool, exactErr error, dec estargz.Decompressor, rec io.ReaderAt) (*index, error) {
	links := func() (map[string]*linkAttrs, error) { return hardlinkAttrs(dec, rec, desc.Size) }
	if t, ok := any(r).(*tocTree); ok {
		// The tree has every entry in tar order: no second parse.
		links = func() (map[string]*linkAttrs, error) { return t.hardlinkAttrs(), nil }
	}
	var (
		exact map[string]*exactInfo
		view  string
		err   error
	)
	switch {
	case !hasExact:
		view = "approximate: the layer has no exact record (names that are not UTF-8 and sub-second mtimes are as the TOC says)"
	case exactErr != nil:
		view = fmt.Sprintf("approximate: exact record not read: %v", exactErr)
	default:
		if exact, err = readExact(r, exactDigest, exactOff); err != nil {
			view = fmt.Sprintf("approximate: exact record not used: %v", err)
		}
	}
	// buildIndex refuses a TOC with a chunk that has no valid digest, so
	// every byte served can be checked.
	ix, err := buildIndexFrom(r, exact, links)
	if err != nil && exact != nil {
		view = fmt.Sprintf("approximate: exact record not used: %v", err)
		ix, err = buildIndexFrom(r, nil, links)
	}
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	if exact != nil && view == "" {
		view = ViewExact
	}
	ix.view = view
	return ix, nil
}

// SetLocal tells the layer that dir holds its complete, verified tree:
// files opened from now on are served from there (with FUSE passthrough
// where enabled), and open files read from there too.
func (l *Layer) SetLocal(dir string) {
	l.local.Store(&dir)
	l.complete.Store(true)
}

// SetPlaced tells the layer that population places each file, once
// verified, at its path under dir (and nothing unverified ever appears
// there): a file found there is served from there like a local layer's,
// others lazily. "" says there is no such place.
func (l *Layer) SetPlaced(dir string) { l.local.Store(&dir) }

// localDir returns where verified files are, or "" while there is no such
// place.
func (l *Layer) localDir() string {
	if p := l.local.Load(); p != nil {
		return *p
	}
	return ""
}

// Chunks lists the digests of the layer's chunks, for removing them from
// the cache once the layer is local.
func (l *Layer) Chunks() []digest.Digest {
	ds := make([]digest.Digest, len(l.ix.chunks))
	for i := range l.ix.chunks {
		ds[i] = l.ix.chunks[i].dgst()
	}
	return ds
}

// DropBlob deletes the local blob copy: the layer is local and needs it
// no more.
func (l *Layer) DropBlob() error {
	if l.f.partial == nil {
		return nil
	}
	return l.f.partial.remove()
}

// Close stops the prefetch that Mount started and the fetches that reads
// left running, and waits for them to return, then saves what the local
// blob copy holds and closes it.
func (l *Layer) Close() error {
	l.mu.Lock()
	cancel, prefetched, aheadDone := l.cancel, l.prefetched, l.aheadDone
	l.mu.Unlock()
	if cancel != nil {
		cancel()
		<-prefetched
		<-aheadDone
	}
	l.f.stopBackground()
	if l.f.partial == nil {
		return nil
	}
	return l.f.partial.close()
}

// ViewExact is what View says of a layer whose exact record was used.
const ViewExact = "exact"

// View says whether the layer's lazy view is exact (ViewExact: its exact
// record was verified and used) or approximate, and why.
func (l *Layer) View() string { return l.ix.view }

// SaveTOC writes the footer and TOC bytes Open read to path (see
// Recorded.Save), for Open after a restart, and forgets them: a layer of
// many files keeps megabytes in them. It fails once it succeeded.
func (l *Layer) SaveTOC(path string) error {
	l.tocMu.Lock()
	defer l.tocMu.Unlock()
	if l.toc == nil {
		return errors.New("the TOC was saved already")
	}
	if err := l.toc.Save(path); err != nil {
		return err
	}
	l.toc = nil
	return nil
}

// Entries is the number of inodes in the layer.
func (l *Layer) Entries() int { return len(l.ix.entries) }

// Stats is what a lazy layer has done so far.
type Stats struct {
	Requests     int64 // ranged requests made for chunks
	FetchedBytes int64 // compressed bytes received for chunks
	Reads        int64 // FUSE read requests served
	FUSERequests int64 // FUSE requests of every kind answered
	// Bound counts the regular files of a data mount (MountData) the
	// kernel holds looked up: each was first opened before it was local,
	// and reads through FUSE until the kernel forgets it.
	Bound int64
}

// Stats returns the layer's counters.
func (l *Layer) Stats() Stats {
	return Stats{
		Requests: l.f.requests.Load(), FetchedBytes: l.f.fetched.Load(), Reads: l.reads.Load(),
		FUSERequests: l.fuseRequests.Load(), Bound: l.bound.Load(),
	}
}

// entryTimeout is how long the kernel may cache names and attributes: a
// layer never changes.
const entryTimeout = time.Hour

// Mount serves the layer read-only at mountpoint and starts fetching the
// files of its access profile (Options.ProfileDir), then those eStargz
// prioritized.
func (l *Layer) Mount(ctx context.Context, mountpoint string) error {
	return l.mount(ctx, mountpoint, "", false)
}

// Resume serves the FUSE connection an earlier daemon kept for
// mountpoint (Options.Handover) if it serves this layer under prefix
// ("" for Mount), even if the mount was detached since (overlays still
// use it); it reports false, mounting nothing, if there is none.
func (l *Layer) Resume(ctx context.Context, mountpoint, prefix string) (bool, error) {
	if err := l.mount(ctx, mountpoint, prefix, true); err != nil {
		if errors.Is(err, errNotHeld) {
			return false, nil
		}
		return false, err
	}
	return true, nil
}

var errNotHeld = errors.New("no FUSE connection kept for this layer")

// MountData is Mount for a data-only overlay layer: the mount's root holds
// the layer's tree at prefix (e.g. ".lazylayer/<id>"), where the
// redirects of its metadata tree look its files up, and nothing else.
func (l *Layer) MountData(ctx context.Context, mountpoint, prefix string) error {
	if prefix == "" || path.Clean(prefix) != prefix || path.IsAbs(prefix) || strings.HasPrefix(prefix, "..") {
		return fmt.Errorf("mount layer %s: bad prefix %q", l.desc.Digest, prefix)
	}
	return l.mount(ctx, mountpoint, prefix, false)
}

// mount serves the layer at mountpoint: on the connection an earlier
// daemon kept, else (unless resumeOnly) on a new mount.
func (l *Layer) mount(ctx context.Context, mountpoint, prefix string, resumeOnly bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.server != nil {
		return fmt.Errorf("layer %s is already mounted at %s", l.desc.Digest, l.mountpoint)
	}
	var names []string
	if prefix != "" {
		names = strings.Split(prefix, "/")
	}
	note, _ := json.Marshal(heldNote{Layer: l.desc.Digest, Prefix: prefix, Index: l.ix.fingerprint()})
	raw := newRawFS(l, names)
	conn, resumed := l.takeHeld(ctx, mountpoint, note, raw, resumeOnly)
	if conn == nil && resumeOnly {
		return errNotHeld
	}
	if conn == nil {
		var err error
		if conn, err = fusefd.Mount(mountpoint, "lazylayer"); err != nil {
			return fmt.Errorf("mount layer %s: %w", l.desc.Digest, err)
		}
	}
	opts := fuse.MountOptions{
		AllowOther:         true,
		FsName:             "lazylayer",
		Name:               "lazylayer",
		MaxStackDepth:      1,
		MaxWrite:           fusefd.MaxWrite,
		DisableReadDirPlus: true,
	}
	if l.handover != nil {
		raw.save = func(state []byte) error { return l.handover.SetState(mountpoint, state) }
	}
	server, err := fusefd.Serve(conn, &countingFS{RawFileSystem: raw, l: l}, opts)
	if err != nil && server == nil {
		if !resumed {
			unix.Unmount(mountpoint, unix.MNT_DETACH)
		}
		conn.Close()
		return fmt.Errorf("serve layer %s at %s: %w", l.desc.Digest, mountpoint, err)
	}
	if err != nil {
		log.G(ctx).WithError(err).WithField("layer", l.desc.Digest).Warn("requests the last daemon left unanswered wait until the mount ends")
	}
	go server.Serve()
	if !resumed {
		if err := fusefd.NoPoll(mountpoint); err != nil {
			log.G(ctx).WithError(err).WithField("layer", l.desc.Digest).Warn("cannot turn FUSE POLL off")
		}
	}
	if l.handover != nil {
		if err := l.handover.Keep(mountpoint, conn, note); err != nil {
			log.G(ctx).WithError(err).WithField("layer", l.desc.Digest).Warn("the FUSE connection is not kept: containers using the layer break if the daemon stops")
		} else if resumed {
			// Keep recorded the connection afresh, without state: record
			// the backing ids taken over again, or the daemon after the
			// next crash (or after a stop while the mount is detached,
			// which records nothing) registers another backing file for
			// an inode the kernel holds one for, and its opens fail.
			if err := raw.persist(false); err != nil {
				log.G(ctx).WithError(err).WithField("layer", l.desc.Digest).Warn("cannot record the backing files taken over")
			}
		}
	}
	if resumed {
		log.G(ctx).WithField("layer", l.desc.Digest).WithField("mountpoint", mountpoint).Info("serving the FUSE connection the last daemon left")
	}
	l.server, l.raw, l.conn, l.resumed, l.mountpoint = server, raw, conn, resumed, mountpoint
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	prefetched, aheadDone := make(chan struct{}), make(chan struct{})
	l.cancel, l.prefetched, l.aheadDone = cancel, prefetched, aheadDone
	go func() {
		defer close(prefetched)
		l.replay(bg)
		l.prefetch(bg)
		l.fetchStartFiles(bg)
	}()
	go func() {
		defer close(aheadDone)
		l.readDirsAhead(bg, raw.ahead)
	}()
	return nil
}

// heldNote is what a layer records with its kept FUSE connection: a daemon
// serves it again only for the same layer, presented the same way.
type heldNote struct {
	Layer  digest.Digest `json:"layer"`
	Prefix string        `json:"prefix"`
	Index  string        `json:"index"` // index.fingerprint: node ids follow entry numbers
}

// takeHeld returns the connection an earlier daemon kept for mountpoint if
// it serves this layer (note) and is still mounted there; a kept
// connection that does not is closed.
func (l *Layer) takeHeld(ctx context.Context, mountpoint string, note []byte, raw *rawFS, detachedOK bool) (*fusefd.Conn, bool) {
	if l.handover == nil {
		return nil, false
	}
	held, ok := l.handover.Take(mountpoint)
	if !ok {
		return nil, false
	}
	if string(held.Note) == string(note) && (detachedOK || fusefd.Mounted(mountpoint, "lazylayer")) {
		if err := raw.restore(held.State); err != nil {
			log.G(ctx).WithError(err).WithField("layer", l.desc.Digest).Warn("the state the last daemon recorded is unreadable; its open files are served as page-cache opens")
		}
		return &held.Conn, true
	}
	log.G(ctx).WithField("layer", l.desc.Digest).WithField("mountpoint", mountpoint).
		Warn("the FUSE connection the last daemon left is not this layer's or no longer mounted; mounting afresh")
	unix.Unmount(mountpoint, unix.MNT_DETACH)
	held.Conn.Close()
	l.handover.Drop(mountpoint)
	return nil, false
}

// Resumed reports whether the layer's mount is served on a FUSE connection
// an earlier daemon left.
func (l *Layer) Resumed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.resumed
}

// Unmount stops the prefetch that Mount started and detaches the mount
// from the file system tree. Overlays that use it keep reading through the
// server until they are unmounted; done is closed when the server has
// stopped and the prefetch has returned.
func (l *Layer) Unmount() (done <-chan struct{}, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ch := make(chan struct{})
	if l.server == nil {
		close(ch)
		return ch, nil
	}
	l.cancel()
	if err := unix.Unmount(l.mountpoint, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return nil, fmt.Errorf("unmount %s: %w", l.mountpoint, err)
	}
	server, prefetched, aheadDone, conn, mp := l.server, l.prefetched, l.aheadDone, l.conn, l.mountpoint
	l.server, l.conn = nil, nil
	go func() {
		server.Wait()
		<-prefetched
		<-aheadDone
		if l.handover != nil {
			l.handover.Drop(mp)
		}
		conn.Close()
		close(ch)
	}()
	return ch, nil
}

// Leave stops the prefetch that Mount started and leaves the mount and its
// FUSE connection to the next daemon (see Options.Handover): nothing is
// unmounted, and the server answers until the process exits.
func (l *Layer) Leave() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.server == nil {
		return
	}
	l.cancel()
	if err := l.raw.stop(); err != nil {
		log.L.WithError(err).WithField("layer", l.desc.Digest).Warn("cannot record the open files for the next daemon")
	}
	l.server = nil
}

// prefetch fetches the chunks of the files eStargz placed before its
// prefetch landmark, in blob order.
func (l *Layer) prefetch(ctx context.Context) {
	if l.ix.prefetchEnd <= 0 {
		return
	}
	var cs []chunk
	for _, c := range l.ix.chunks {
		if c.offset < l.ix.prefetchEnd {
			cs = append(cs, c)
		}
	}
	sort.Slice(cs, func(i, j int) bool { return cs[i].offset < cs[j].offset })
	start := time.Now()
	for len(cs) > 0 {
		n := l.f.span(cs)
		if _, err := l.f.load(ctx, cs[:n]); err != nil {
			if ctx.Err() == nil {
				log.G(ctx).WithError(err).WithField("layer", l.desc.Digest).Warn("prefetch of prioritized files failed")
			}
			return
		}
		cs = cs[n:]
	}
	log.G(ctx).WithField("layer", l.desc.Digest).WithField("elapsed", time.Since(start).Round(time.Millisecond)).
		Debug("prioritized files fetched")
}
