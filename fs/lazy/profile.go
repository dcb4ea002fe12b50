package lazy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/lazylayer/lazylayer/cache"
)

// Profile is a layer's access profile: the files a container opened while
// the layer was lazy, in first-open order, recorded on one node and
// replayed on any other that mounts the same layer (Options.ProfileDir).
// It is keyed by the layer's blob digest and its TOC digest, and its paths
// are the layer's own, relative to its root, as its index knows them.
//
// A profile is a hint read from a file an operator distributes: it is
// bounded (maxProfileSize, maxAccessed paths of at most maxProfilePath
// bytes), a path not in the layer's index is skipped, and a profile that
// does not parse or names another layer or TOC is ignored with a log line.
// Replaying it fetches only bytes verified against the TOC, like any read.
type Profile struct {
	Version int           `json:"version"`
	Layer   digest.Digest `json:"layer"`
	TOC     digest.Digest `json:"toc"`
	Files   []string      `json:"files"`
}

// ProfileVersion is the format Version WriteProfile writes and
// ReadProfile accepts.
const ProfileVersion = 1

// Bounds on what ReadProfile accepts.
const (
	maxProfileSize = 16 << 20
	maxProfilePath = 4096
)

// ProfileName is the name of the profile file of the layer with blob
// digest d in a profile directory: "sha256-<hex>.json".
func ProfileName(d digest.Digest) string {
	return d.Algorithm().String() + "-" + d.Encoded() + ".json"
}

// WriteProfile writes p into dir as ProfileName(p.Layer), replacing the
// file there atomically.
func WriteProfile(dir string, p Profile) error {
	if err := p.Layer.Validate(); err != nil {
		return fmt.Errorf("write profile: layer %q: %w", p.Layer, err)
	}
	p.Version = ProfileVersion
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	if len(b) > maxProfileSize {
		return fmt.Errorf("write profile of layer %s: %d bytes, more than the %d a reader accepts", p.Layer, len(b), maxProfileSize)
	}
	f, err := os.CreateTemp(dir, ".profile-*")
	if err != nil {
		return fmt.Errorf("write profile of layer %s: %w", p.Layer, err)
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(dir, ProfileName(p.Layer)))
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write profile of layer %s: %w", p.Layer, err)
	}
	return nil
}

// errNoProfile is returned by ReadProfile when there is no profile for
// the layer.
var errNoProfile = errors.New("no profile")

// ReadProfile reads the profile of the layer with blob digest layer from
// dir and checks its form and bounds, and that it is the profile of layer.
// Whether its TOC and paths fit the layer is checked when it is replayed.
func ReadProfile(dir string, layer digest.Digest) (*Profile, error) {
	name := filepath.Join(dir, ProfileName(layer))
	f, err := os.Open(name)
	if errors.Is(err, os.ErrNotExist) {
		return nil, errNoProfile
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return nil, err
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", name)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxProfileSize+1))
	if err != nil {
		return nil, err
	}
	p, err := parseProfile(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if p.Layer != layer {
		return nil, fmt.Errorf("%s: the profile of layer %s, not %s", name, p.Layer, layer)
	}
	return p, nil
}

// parseProfile decodes a profile and checks its form and bounds.
func parseProfile(b []byte) (*Profile, error) {
	if len(b) > maxProfileSize {
		return nil, fmt.Errorf("profile larger than %d bytes", maxProfileSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p Profile
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("profile does not parse: %w", err)
	}
	if dec.More() {
		return nil, errors.New("profile: data after the JSON object")
	}
	if p.Version != ProfileVersion {
		return nil, fmt.Errorf("profile version %d, want %d", p.Version, ProfileVersion)
	}
	if err := p.Layer.Validate(); err != nil {
		return nil, fmt.Errorf("profile layer %q: %w", p.Layer, err)
	}
	if err := p.TOC.Validate(); err != nil {
		return nil, fmt.Errorf("profile toc %q: %w", p.TOC, err)
	}
	if len(p.Files) > maxAccessed {
		return nil, fmt.Errorf("profile lists %d files, more than %d", len(p.Files), maxAccessed)
	}
	for _, f := range p.Files {
		if len(f) > maxProfilePath {
			return nil, fmt.Errorf("profile path of %d bytes, more than %d", len(f), maxProfilePath)
		}
	}
	return &p, nil
}

// resolve returns the entries of the regular files with content that the
// paths name, in the order given, each once, and how many paths it
// skipped: not in the index, not a regular file, or not a clean relative
// path. It never leaves the index: paths are looked up name by name from
// the root, and symlinks are not followed.
func (ix *index) resolve(paths []string) (files []uint32, skipped int) {
	seen := map[uint32]bool{}
	for _, p := range paths {
		if !cleanRelative(p) {
			skipped++
			continue
		}
		num, ok := ix.lookupPath(p)
		if !ok {
			skipped++
			continue
		}
		if seen[num] {
			continue
		}
		e := &ix.entries[num]
		if e.mode&syscall.S_IFMT != syscall.S_IFREG || e.count == 0 {
			skipped++
			continue
		}
		seen[num] = true
		files = append(files, num)
	}
	return files, skipped
}

// cleanRelative reports whether p is a path relative to the layer root
// with no "." or ".." or empty names, as profiles record them.
func cleanRelative(p string) bool {
	if p == "" || strings.HasPrefix(p, "/") {
		return false
	}
	for name := range strings.SplitSeq(p, "/") {
		if name == "" || name == "." || name == ".." {
			return false
		}
	}
	return true
}

// Bounds on the requests a replay makes.
const (
	// replayGap is the largest stretch of the blob no profiled file needs
	// that a replay request still spans: on 100 Mbit/s, 128 KiB take half
	// of a 20 ms round trip, and population needs those bytes anyway. For
	// python's top layer (77 files, 6.0 MB of chunks in 49 stretches) it
	// gives 16 requests and 7.2 MB; 256 KiB gave 12 and 7.9 MB, 64 KiB 22
	// and 6.6 MB.
	replayGap = 128 << 10
	// replaySpan bounds one replay request, so that several go out at
	// once and the files opened first arrive first.
	replaySpan = 4 << 20
)

// replayPlan groups the chunks of files (in first-open order) that are
// not in the cache into requests: chunks in blob order, apart by at most
// replayGap, up to replaySpan (or maxSpan) per request; the requests in
// the order of the first-opened file they carry.
func (f *fetcher) replayPlan(ix *index, files []uint32) [][]chunk {
	type ranked struct {
		c    chunk
		rank int
	}
	var cs []ranked
	seen := map[[32]byte]bool{}
	for rank, num := range files {
		for _, c := range ix.fileChunks(&ix.entries[num]) {
			if seen[c.digest] || f.cache.Has(c.dgst()) {
				continue
			}
			seen[c.digest] = true
			cs = append(cs, ranked{c, rank})
		}
	}
	sort.Slice(cs, func(i, j int) bool {
		if cs[i].c.offset != cs[j].c.offset {
			return cs[i].c.offset < cs[j].c.offset
		}
		return cs[i].c.inner < cs[j].c.inner
	})
	limit := min(int64(replaySpan), f.maxSpan)
	type group struct {
		cs   []chunk
		rank int
	}
	var groups []group
	var start, end int64
	for _, r := range cs {
		if n := len(groups); n > 0 && r.c.offset <= end+replayGap && (r.c.end-start <= limit || r.c.offset < end) {
			g := &groups[n-1]
			g.cs = append(g.cs, r.c)
			g.rank = min(g.rank, r.rank)
			end = max(end, r.c.end)
			continue
		}
		groups = append(groups, group{cs: []chunk{r.c}, rank: r.rank})
		start, end = r.c.offset, r.c.end
	}
	sort.SliceStable(groups, func(i, j int) bool { return groups[i].rank < groups[j].rank })
	out := make([][]chunk, len(groups))
	for i, g := range groups {
		out[i] = g.cs
	}
	return out
}

// fetchWhole fetches the chunks of cs that are missing in one request
// spanning them all, gaps included: a replay's groups are planned so.
func (f *fetcher) fetchWhole(ctx context.Context, cs []chunk, missing []digest.Digest, deliver cache.Deliver) (map[digest.Digest][]byte, error) {
	todo := missingChunks(cs, missing)
	out := make(map[digest.Digest][]byte, len(todo))
	if len(todo) == 0 {
		return out, nil
	}
	sort.Slice(todo, func(i, j int) bool {
		if todo[i].offset != todo[j].offset {
			return todo[i].offset < todo[j].offset
		}
		return todo[i].inner < todo[j].inner
	})
	if err := f.fetchSpan(ctx, todo, out, deliver); err != nil {
		return nil, err
	}
	return out, nil
}

// replay fetches the files of the layer's access profile into the chunk
// cache, in a few large requests, maxParallel at once, each verified like
// every read: as on-demand requests, which population yields to. A
// failure is logged: the files then load on demand.
func (l *Layer) replay(ctx context.Context) {
	if len(l.profile) == 0 || l.complete.Load() {
		return
	}
	start := time.Now()
	groups := l.f.replayPlan(l.ix, l.profile)
	var bytes, gaps int64 // spanned; of those, in no profiled file's streams
	for _, g := range groups {
		end := g[0].end
		for _, c := range g {
			if c.offset > end {
				gaps += c.offset - end
			}
			end = max(end, c.end)
		}
		bytes += end - g[0].offset
	}
	entry := log.G(ctx).WithField("layer", l.desc.Digest)
	if len(groups) == 0 {
		entry.Debug("the files of the access profile are cached already")
		return
	}
	entry.WithFields(log.Fields{"files": len(l.profile), "requests": len(groups), "bytes": bytes, "gaps": gaps}).Info("replaying the access profile")
	if err := l.f.fetchGroups(ctx, groups); err != nil {
		if ctx.Err() == nil {
			entry.WithError(err).Warn("replaying the access profile failed; its files load on demand")
		}
		return
	}
	entry.WithField("elapsed", time.Since(start).Round(time.Millisecond)).Info("access profile replayed")
}

// fetchGroups loads groups of chunks planned by replayPlan, each group in
// one request, maxParallel at a time.
func (f *fetcher) fetchGroups(ctx context.Context, groups [][]chunk) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(maxParallel)
	for _, cs := range groups {
		g.Go(func() error {
			_, err := f.loadWith(gctx, cs, f.fetchWhole)
			return err
		})
	}
	return g.Wait()
}

// loadProfile reads the layer's access profile from dir, if there is
// one, and keeps the files it names that the index has. A profile that
// cannot be used is logged and ignored.
func (l *Layer) loadProfile(ctx context.Context, dir string) {
	entry := log.G(ctx).WithField("layer", l.desc.Digest)
	p, err := ReadProfile(dir, l.desc.Digest)
	if errors.Is(err, errNoProfile) {
		return
	}
	if err != nil {
		entry.WithError(err).Warn("access profile ignored")
		return
	}
	if p.TOC != l.tocDigest {
		entry.Warnf("access profile ignored: recorded for TOC %s, the layer's is %s", p.TOC, l.tocDigest)
		return
	}
	files, skipped := l.ix.resolve(p.Files)
	if skipped > 0 {
		entry.WithField("skipped", skipped).Info("access profile: paths not regular files of the layer skipped")
	}
	l.profile = slices.Clip(files)
}

// ReplayAhead fetches the files of the access profile of the layer desc,
// if o.ProfileDir holds one, into o.Cache before the layer is mounted:
// from its footer and TOC read ahead (toc, see ReadTOC), while containerd
// prepares the image's layers below it. The layer's Mount then finds them
// cached, or waits for the requests under way. It returns once the replay
// is over (a failure is logged), with the compressed bytes it fetched (up
// to 64 MiB), for the mounted layer's blob copy (Layer.Keep), or nil.
func ReplayAhead(ctx context.Context, toc *Recorded, blob Blob, desc ocispec.Descriptor, tocDigest digest.Digest, o Options) *Recorded {
	if o.ProfileDir == "" || o.Cache == nil {
		return nil
	}
	if _, err := os.Stat(filepath.Join(o.ProfileDir, ProfileName(desc.Digest))); err != nil {
		return nil
	}
	o.BlobPath = ""
	l, err := Open(ctx, toc, blob, desc, tocDigest, o)
	if err != nil {
		log.G(ctx).WithError(err).WithField("layer", desc.Digest).Debug("no replay of the access profile ahead of the mount")
		return nil
	}
	defer l.Close()
	l.f.fetchedAhead = &Recorded{}
	l.replay(ctx)
	return l.f.fetchedAhead
}

// Keep writes the bytes of the blob in r (what ReplayAhead fetched) into
// the layer's blob copy, so that population need not fetch them again.
func (l *Layer) Keep(ctx context.Context, r *Recorded) {
	r.mu.Lock()
	ranges := r.ranges
	r.mu.Unlock()
	for _, rg := range ranges {
		l.f.keep(ctx, rg.b, rg.off)
	}
}
