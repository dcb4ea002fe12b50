package layer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sync/singleflight"

	"github.com/lazylayer/lazylayer/fs/extract"
	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/fs/meta"
	"github.com/lazylayer/lazylayer/remote"
)

// Labels containerd passes to Prepare for an image layer.
const (
	labelImageRef    = snapshotters.TargetRefLabel
	labelManifest    = snapshotters.TargetManifestDigestLabel
	labelLayer       = snapshotters.TargetLayerDigestLabel
	labelImageLayers = snapshotters.TargetImageLayersLabel
	labelDiffID      = snapshots.LabelSnapshotDiffID
)

// Registry is what the Manager needs from a registry.
type Registry interface {
	// Manifest returns the verified image manifest dgst of ref.
	Manifest(ctx context.Context, ref string, dgst digest.Digest) (ocispec.Manifest, error)
	// Open returns the whole blob desc of ref's repository, unverified.
	Open(ctx context.Context, ref string, desc ocispec.Descriptor) (io.ReadCloser, error)
	// Ranges returns the blob desc of ref's repository for ranged reads,
	// without network I/O.
	Ranges(ctx context.Context, ref string, desc ocispec.Descriptor) (lazy.Blob, error)
}

// Config tunes a Manager.
type Config struct {
	// Staging is where layers are extracted before they are handed to a
	// snapshot. It must be on the filesystem of the snapshots (rename).
	Staging string
	// ConcurrentLayers bounds the layers fetched ahead of containerd's
	// requests at once (default 3). A layer containerd waits for is never
	// queued behind them.
	ConcurrentLayers int
	// StagedTTL is how long a layer fetched ahead waits to be claimed
	// before it is deleted (default 2 minutes).
	StagedTTL time.Duration
	// StagingLimit bounds the compressed size of the layers fetched ahead
	// and not yet claimed (default 2 GiB). A layer that would pass it is
	// fetched when containerd asks for it.
	StagingLimit int64
	// Lazy, when its Cache is set, serves eStargz and zstd:chunked layers
	// lazily over FUSE instead of fetching them in full.
	Lazy lazy.Options
	// Populate tunes the background download of lazy layers.
	Populate lazy.PopulateOptions
	// Native presents lazy layers to overlay as metadata trees with their
	// data in data-only layers (native metadata; see native.go), so that
	// containers started lazily end up reading natively. It needs
	// DataDir, on the file system of the snapshots and Staging, and a
	// kernel meta.Check accepts.
	Native bool
	// DataDir is where population places verified files under native
	// metadata.
	DataDir string
	// Policy says when a lazy layer's background download starts.
	Policy Policy
	// PopulateDelay is how long after a lazy layer is committed its
	// background download may start under PolicyAuto (0: at once). It
	// starts no earlier than Lazy.Activity has been quiet for
	// Populate.Quiet: pulls (Prepare) and on-demand reads go first.
	PopulateDelay time.Duration
	// PopulateAttempts bounds the downloads of a layer whose blob proves
	// wrong (default 3); the layer then stays lazy, served from verified
	// chunks, and its status says why.
	PopulateAttempts int
	// SwapGrace is how long a layer's FUSE mount stays attached after the
	// layer turned local, for containers handed it just before (default
	// 30 s).
	SwapGrace time.Duration
	// Metrics, if set, is told of every layer fetched in full.
	Metrics Metrics
}

// Metrics receives the full fetches of layers, for the daemon's metrics
// endpoint. It must be safe for concurrent use.
type Metrics interface {
	// FullFetch observes one layer fetched whole: bytes of its blob in
	// elapsed. background is true for the population of a lazy layer,
	// false for a plain layer fetched and unpacked for containerd.
	FullFetch(bytes int64, elapsed time.Duration, background bool)
}

// Policy says when lazy layers download in the background.
type Policy int

const (
	// PolicyAuto starts a layer's download PopulateDelay after its
	// snapshot is committed, once no pull or on-demand read is under way.
	PolicyAuto Policy = iota
	// PolicyManual holds every layer lazy until Populate releases it.
	PolicyManual
)

// Manager obtains image layers from a registry and hands them to snapshots
// as verified local trees. It implements the snapshot package's FileSystem.
//
// When containerd asks for layer i of an image, the Manager also starts
// fetching the layers above it (containerd lists them in the
// cri.image-layers label), so the layers of one image download and unpack
// concurrently while containerd still asks for them one at a time.
type Manager struct {
	reg Registry
	cfg Config

	ctx    context.Context // background work; cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sem    chan struct{} // slots for layers fetched ahead
	// building bounds the metadata trees built at once by their entries
	// (treeEntriesAtOnce): the small trees of an image's layers are built
	// together, a large one alone, so that the trees of an image's many
	// layers do not hold their entries all at once.
	building *semaphore.Weighted
	group    singleflight.Group

	mu        sync.Mutex
	closed    bool                               // guarded by mu
	jobs      map[digest.Digest]*job             // guarded by mu
	dropped   map[digest.Digest]bool             // fetched ahead, deleted for a full disk: not fetched ahead again; guarded by mu
	tocs      map[digest.Digest]*tocJob          // guarded by mu
	manifests map[digest.Digest]ocispec.Manifest // guarded by mu
	lazy      map[string]*Lazy                   // by snapshot directory; guarded by mu
}

// New returns a Manager. Whatever is left in cfg.Staging from an earlier run
// is deleted.
func New(ctx context.Context, reg Registry, cfg Config) (*Manager, error) {
	if cfg.Staging == "" {
		return nil, errors.New("layer manager: no staging directory")
	}
	if cfg.ConcurrentLayers <= 0 {
		cfg.ConcurrentLayers = 3
	}
	if cfg.StagedTTL <= 0 {
		cfg.StagedTTL = 2 * time.Minute
	}
	if cfg.StagingLimit <= 0 {
		cfg.StagingLimit = 2 << 30
	}
	if cfg.PopulateAttempts <= 0 {
		cfg.PopulateAttempts = 3
	}
	if cfg.SwapGrace <= 0 {
		cfg.SwapGrace = 30 * time.Second
	}
	if cfg.Lazy.Activity == nil {
		// One for all layers: each layer's population yields to the
		// pull and the reads of every layer.
		cfg.Lazy.Activity = new(lazy.Activity)
	}
	if err := os.RemoveAll(cfg.Staging); err != nil {
		return nil, fmt.Errorf("clear staging directory: %w", err)
	}
	if err := os.MkdirAll(cfg.Staging, 0o700); err != nil {
		return nil, err
	}
	if cfg.Native {
		if cfg.DataDir == "" {
			return nil, errors.New("layer manager: native metadata needs a data directory")
		}
		if err := os.MkdirAll(filepath.Join(cfg.DataDir, meta.RedirectRoot), 0o700); err != nil {
			return nil, err
		}
	}
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	return &Manager{
		reg:       reg,
		cfg:       cfg,
		ctx:       bg,
		cancel:    cancel,
		sem:       make(chan struct{}, cfg.ConcurrentLayers),
		building:  semaphore.NewWeighted(treeEntriesAtOnce),
		jobs:      map[digest.Digest]*job{},
		dropped:   map[digest.Digest]bool{},
		tocs:      map[digest.Digest]*tocJob{},
		manifests: map[digest.Digest]ocispec.Manifest{},
		lazy:      map[string]*Lazy{},
	}, nil
}

// Close stops background fetches and population and deletes staged layers.
// With Config.Lazy.Handover it leaves the lazy mounts and their FUSE
// connections to the next daemon, whose Restore serves them again; the
// servers answer until the process exits. Without, it detaches them
// (overlays that use them keep them until they are unmounted). Nothing
// else the Manager started runs after Close returns.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	m.mu.Lock()
	lazy := m.lazy
	m.lazy = map[string]*Lazy{}
	m.mu.Unlock()
	var errs []error
	for _, ll := range lazy {
		if m.cfg.Lazy.Handover != nil {
			errs = append(errs, ll.leave(context.Background()))
		} else {
			errs = append(errs, ll.stop(context.Background()))
		}
	}
	errs = append(errs, os.RemoveAll(m.cfg.Staging))
	return errors.Join(errs...)
}

// Prepare implements snapshot.FileSystem: it mounts the layer the labels
// name lazily at dir/lazy when it can, and returns it; otherwise it fills
// dir/fs with its verified tree and returns nil. While it works, the
// population of lazy layers yields to it: a pull is on-demand work.
func (m *Manager) Prepare(ctx context.Context, dir string, parents []string, labels map[string]string) (*Lazy, error) {
	defer m.cfg.Lazy.Activity.Begin()()
	ref := labels[labelImageRef]
	mdgst, err := digest.Parse(labels[labelManifest])
	if err != nil {
		return nil, fmt.Errorf("label %s: %w", labelManifest, err)
	}
	ldgst, err := digest.Parse(labels[labelLayer])
	if err != nil {
		return nil, fmt.Errorf("label %s: %w", labelLayer, err)
	}
	start := time.Now()
	manifest, err := m.manifest(ctx, ref, mdgst)
	if err != nil {
		return nil, err
	}
	ph := phases{}
	ph.since("manifest", start)
	desc, ok := findLayer(manifest, ldgst)
	if !ok {
		return nil, fmt.Errorf("layer %s is not in manifest %s of %s", ldgst, mdgst, ref)
	}
	for _, d := range strings.Split(labels[labelImageLayers], ",") {
		next, ok := findLayer(manifest, digest.Digest(d))
		switch {
		case !ok || next.Digest == ldgst:
		case m.lazyCapable(next):
			m.startTOC(ref, next)
		default:
			m.start(ref, next, false)
		}
	}
	if m.lazyCapable(desc) {
		l, err := m.mountLazy(ctx, dir, ref, desc, digest.Digest(labels[labelDiffID]), ph)
		if err == nil {
			return l, nil
		}
		log.G(ctx).WithError(err).WithField("layer", desc.Digest).Warn("cannot serve layer lazily; fetching it in full")
	}
	if err := m.fetch(ctx, filepath.Join(dir, "fs"), ref, desc, parents, labels[labelDiffID]); err != nil {
		return nil, err
	}
	return nil, nil
}

// manifest returns the manifest dgst of ref, fetched once.
func (m *Manager) manifest(ctx context.Context, ref string, dgst digest.Digest) (ocispec.Manifest, error) {
	m.mu.Lock()
	mf, ok := m.manifests[dgst]
	m.mu.Unlock()
	if ok {
		return mf, nil
	}
	v, err, _ := m.group.Do(dgst.String(), func() (any, error) {
		mf, err := m.reg.Manifest(ctx, ref, dgst)
		if err != nil {
			return nil, classify(err)
		}
		m.mu.Lock()
		if len(m.manifests) >= 256 {
			clear(m.manifests)
		}
		m.manifests[dgst] = mf
		m.mu.Unlock()
		return mf, nil
	})
	if err != nil {
		return ocispec.Manifest{}, err
	}
	return v.(ocispec.Manifest), nil
}

func findLayer(m ocispec.Manifest, dgst digest.Digest) (ocispec.Descriptor, bool) {
	for _, l := range m.Layers {
		if l.Digest == dgst {
			return l, true
		}
	}
	return ocispec.Descriptor{}, false
}

// classify makes a registry's wrong answer a data-loss error, so that the
// snapshotter refuses the layer instead of handing it to containerd.
func classify(err error) error {
	if err != nil && errors.Is(err, remote.ErrBadData) && !errdefs.IsDataLoss(err) {
		return fmt.Errorf("%w: %w", err, extract.ErrInvalid)
	}
	return err
}
