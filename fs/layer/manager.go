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

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/singleflight"

	"github.com/lazylayer/lazylayer/fs/extract"
	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/remote"
)

// The states Prepare reports, as the snapshot package names them.
const (
	stateLocal = "local"
	stateLazy  = "lazy"
)

// Labels containerd passes to Prepare for an image layer.
const (
	labelImageRef    = "containerd.io/snapshot/cri.image-ref"
	labelManifest    = "containerd.io/snapshot/cri.manifest-digest"
	labelLayer       = "containerd.io/snapshot/cri.layer-digest"
	labelImageLayers = "containerd.io/snapshot/cri.image-layers"
	labelDiffID      = "containerd.io/snapshot/diff-id"
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
	// before it is deleted (default 10 minutes).
	StagedTTL time.Duration
	// Lazy, when its Cache is set, serves eStargz and zstd:chunked layers
	// lazily over FUSE instead of fetching them in full.
	Lazy lazy.Options
	// Populate tunes the background download of lazy layers.
	Populate lazy.PopulateOptions
	// PopulateDelay is how long after a lazy layer is mounted its
	// background download starts; negative turns population off (layers
	// then stay lazy).
	PopulateDelay time.Duration
	// SwapGrace is how long a layer's FUSE mount stays attached after the
	// layer turned local, for containers handed it just before (default
	// 30 s).
	SwapGrace time.Duration
}

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
	group  singleflight.Group

	onLocalOnce sync.Once
	onLocal     func(ctx context.Context, dir string) error // set once, before ready closes
	ready       chan struct{}                               // closed by SetOnLocal

	mu        sync.Mutex
	jobs      map[digest.Digest]*job             // guarded by mu
	tocs      map[digest.Digest]*tocJob          // guarded by mu
	manifests map[digest.Digest]ocispec.Manifest // guarded by mu
	lazy      map[string]*lazyLayer              // by snapshot directory; guarded by mu
}

// job is one layer being fetched and extracted into a staging directory.
type job struct {
	desc ocispec.Descriptor
	done chan struct{} // closed when dir, res and err are set

	dir     string // staged tree when err is nil
	res     extract.Result
	err     error
	elapsed time.Duration

	expire *time.Timer // deletes an unclaimed tree; guarded by Manager.mu
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
		cfg.StagedTTL = 10 * time.Minute
	}
	if cfg.SwapGrace <= 0 {
		cfg.SwapGrace = 30 * time.Second
	}
	if err := os.RemoveAll(cfg.Staging); err != nil {
		return nil, fmt.Errorf("clear staging directory: %w", err)
	}
	if err := os.MkdirAll(cfg.Staging, 0o700); err != nil {
		return nil, err
	}
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	return &Manager{
		reg:       reg,
		cfg:       cfg,
		ctx:       bg,
		cancel:    cancel,
		sem:       make(chan struct{}, cfg.ConcurrentLayers),
		jobs:      map[digest.Digest]*job{},
		tocs:      map[digest.Digest]*tocJob{},
		manifests: map[digest.Digest]ocispec.Manifest{},
		lazy:      map[string]*lazyLayer{},
		ready:     make(chan struct{}),
	}, nil
}

// Close stops background fetches, deletes staged layers and detaches the
// lazy mounts (overlays that use them keep them until they are unmounted).
func (m *Manager) Close() error {
	m.cancel()
	m.wg.Wait()
	m.mu.Lock()
	dirs := make([]string, 0, len(m.lazy))
	for dir := range m.lazy {
		dirs = append(dirs, dir)
	}
	m.mu.Unlock()
	var errs []error
	for _, dir := range dirs {
		errs = append(errs, m.Release(context.Background(), dir))
	}
	errs = append(errs, os.RemoveAll(m.cfg.Staging))
	return errors.Join(errs...)
}

// Prepare implements snapshot.FileSystem: it mounts the layer the labels
// name lazily at dir/lazy when it can, and fills dir/fs with its verified
// tree otherwise.
func (m *Manager) Prepare(ctx context.Context, dir string, parents []string, labels map[string]string) (string, error) {
	ref := labels[labelImageRef]
	mdgst, err := digest.Parse(labels[labelManifest])
	if err != nil {
		return "", fmt.Errorf("label %s: %w", labelManifest, err)
	}
	ldgst, err := digest.Parse(labels[labelLayer])
	if err != nil {
		return "", fmt.Errorf("label %s: %w", labelLayer, err)
	}
	manifest, err := m.manifest(ctx, ref, mdgst)
	if err != nil {
		return "", err
	}
	desc, ok := findLayer(manifest, ldgst)
	if !ok {
		return "", fmt.Errorf("layer %s is not in manifest %s of %s", ldgst, mdgst, ref)
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
		err := m.mountLazy(ctx, dir, ref, desc)
		if err == nil {
			return stateLazy, nil
		}
		log.G(ctx).WithError(err).WithField("layer", desc.Digest).Warn("cannot serve layer lazily; fetching it in full")
	}
	if err := m.fetch(ctx, filepath.Join(dir, "fs"), ref, desc, parents, labels[labelDiffID]); err != nil {
		return "", err
	}
	return stateLocal, nil
}

// fetch fills dir with the verified tree of desc.
func (m *Manager) fetch(ctx context.Context, dir, ref string, desc ocispec.Descriptor, parents []string, diffID string) error {
	ldgst := desc.Digest
	j := m.start(ref, desc, true)
	select {
	case <-j.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	m.claim(j)
	if j.err != nil {
		return j.err
	}
	if want := diffID; want != "" && j.res.DiffID.String() != want {
		os.RemoveAll(j.dir)
		return fmt.Errorf("layer %s: uncompressed tar has digest %s, the image config says %s: %w",
			ldgst, j.res.DiffID, want, extract.ErrInvalid)
	}
	if j.res.ImplicitDirs && len(parents) > 0 {
		// Directories the tar did not list take their attributes from
		// the layers below, which a tree fetched ahead did not know.
		os.RemoveAll(j.dir)
		log.G(ctx).WithField("layer", ldgst).Debug("layer has unlisted directories; extracting again over its parents")
		_, err := m.extract(ctx, ref, desc, dir, parents)
		return err
	}
	return moveTree(j.dir, dir)
}

// start returns the job for desc, starting it when there is none (or when
// the last one failed for a reason other than bad data). An immediate job
// does not wait for a slot.
func (m *Manager) start(ref string, desc ocispec.Descriptor, immediate bool) *job {
	m.mu.Lock()
	defer m.mu.Unlock()
	if j, ok := m.jobs[desc.Digest]; ok {
		select {
		case <-j.done:
			if j.err == nil || errdefs.IsDataLoss(j.err) {
				return j
			}
		default:
			return j
		}
	}
	j := &job{desc: desc, done: make(chan struct{})}
	m.jobs[desc.Digest] = j
	m.wg.Add(1)
	go m.run(j, ref, immediate)
	return j
}

func (m *Manager) run(j *job, ref string, immediate bool) {
	defer m.wg.Done()
	defer close(j.done)
	ctx := log.WithLogger(m.ctx, log.G(m.ctx).WithField("layer", j.desc.Digest))
	if !immediate {
		select {
		case m.sem <- struct{}{}:
			defer func() { <-m.sem }()
		case <-ctx.Done():
			j.err = ctx.Err()
			return
		}
	}
	start := time.Now()
	dir, err := os.MkdirTemp(m.cfg.Staging, "layer-")
	if err == nil {
		err = os.Chmod(dir, 0o755)
	}
	if err != nil {
		j.err = fmt.Errorf("staging directory: %w", err)
		return
	}
	j.res, j.err = m.extract(ctx, ref, j.desc, dir, nil)
	j.elapsed = time.Since(start)
	if j.err != nil {
		os.RemoveAll(dir)
		return
	}
	j.dir = dir
	log.G(ctx).WithField("bytes", j.desc.Size).WithField("elapsed", j.elapsed.Round(time.Millisecond)).
		Info("layer fetched and unpacked")

	m.mu.Lock()
	if m.jobs[j.desc.Digest] == j {
		j.expire = time.AfterFunc(m.cfg.StagedTTL, func() { m.expire(j) })
	}
	m.mu.Unlock()
}

// extract streams desc from the registry into dir.
func (m *Manager) extract(ctx context.Context, ref string, desc ocispec.Descriptor, dir string, parents []string) (extract.Result, error) {
	rc, err := m.reg.Open(ctx, ref, desc)
	if err != nil {
		return extract.Result{}, classify(err)
	}
	defer rc.Close()
	res, err := extract.Layer(ctx, rc, dir, extract.Options{Digest: desc.Digest, Size: desc.Size, Parents: parents})
	return res, classify(err)
}

// claim takes j out of the job table: its tree now belongs to the caller.
func (m *Manager) claim(j *job) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.jobs[j.desc.Digest] == j {
		delete(m.jobs, j.desc.Digest)
	}
	if j.expire != nil {
		j.expire.Stop()
	}
}

// expire deletes a tree fetched ahead that nobody claimed.
func (m *Manager) expire(j *job) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.jobs[j.desc.Digest] != j {
		return
	}
	delete(m.jobs, j.desc.Digest)
	os.RemoveAll(j.dir)
	log.G(m.ctx).WithField("layer", j.desc.Digest).Info("deleted a layer fetched ahead that containerd never asked for")
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
