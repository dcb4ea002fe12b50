package layer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/fs/extract"
	"github.com/lazylayer/lazylayer/fs/lazy"
)

// This file schedules full fetches: a layer containerd asks for is fetched
// at once; the layers above it are fetched ahead into staging, a few at a
// time and within Config.StagingLimit, and wait there to be claimed.

// job is one layer being fetched and extracted into a staging directory.
type job struct {
	desc  ocispec.Descriptor
	ahead bool          // fetched ahead of containerd's request
	done  chan struct{} // closed when dir, res, size and err are set

	dir     string // staged tree when err is nil
	res     extract.Result
	size    int64 // bytes the staged tree takes on disk
	err     error
	elapsed time.Duration

	ctx     context.Context
	cancel  context.CancelFunc // stops a job dropped on a full disk
	urgent  chan struct{}      // closed when containerd waits for the job; guarded by Manager.mu
	claimed bool               // the tree belongs to a snapshot, or was dropped; guarded by Manager.mu
	expire  *time.Timer        // deletes an unclaimed tree; guarded by Manager.mu
}

// fetch fills dir with the verified tree of desc.
func (m *Manager) fetch(ctx context.Context, dir, ref string, desc ocispec.Descriptor, parents []string, diffID string) error {
	ldgst := desc.Digest
	var j *job
	for {
		j = m.start(ref, desc, true)
		select {
		case <-j.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if m.claim(j) {
			break
		}
		// Another snapshot of the same layer took that tree: fetch again.
	}
	if j.err != nil {
		if isNoSpace(j.err) {
			m.dropStaged(ctx)
		}
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
// the last one failed for a reason other than bad data). A layer fetched
// ahead waits for a slot and is not started when the staging limit would
// be passed, or when it was fetched ahead before and deleted for a full
// disk, until containerd asks for it (start then returns nil); a layer containerd waits for
// (urgent) never waits, and takes over a job for it that does.
func (m *Manager) start(ref string, desc ocispec.Descriptor, urgent bool) *job {
	m.mu.Lock()
	defer m.mu.Unlock()
	if j, ok := m.jobs[desc.Digest]; ok {
		reuse := true
		select {
		case <-j.done:
			reuse = j.err == nil || errdefs.IsDataLoss(j.err)
		default:
		}
		if reuse {
			if urgent {
				m.makeUrgent(j)
			}
			return j
		}
	}
	if m.closed {
		if !urgent {
			return nil
		}
		j := &job{desc: desc, done: make(chan struct{}), err: errors.New("layer manager is closed")}
		close(j.done)
		return j
	}
	if !urgent && (m.dropped[desc.Digest] || m.reservedLocked()+desc.Size > m.cfg.StagingLimit) {
		return nil
	}
	if urgent {
		delete(m.dropped, desc.Digest)
	}
	j := &job{desc: desc, ahead: !urgent, done: make(chan struct{}), urgent: make(chan struct{})}
	j.ctx, j.cancel = context.WithCancel(log.WithLogger(m.ctx, log.G(m.ctx).WithField("layer", desc.Digest)))
	if urgent {
		m.makeUrgent(j)
	}
	m.jobs[desc.Digest] = j
	m.wg.Add(1)
	go m.run(j, ref)
	return j
}

// makeUrgent lets j skip the queue of layers fetched ahead. m.mu is held.
func (m *Manager) makeUrgent(j *job) {
	select {
	case <-j.urgent:
	default:
		close(j.urgent)
	}
}

// reservedLocked is the compressed size of the layers fetched ahead and
// not claimed. m.mu is held.
func (m *Manager) reservedLocked() int64 {
	var n int64
	for _, j := range m.jobs {
		if staged(j) {
			n += j.desc.Size
		}
	}
	return n
}

func (m *Manager) run(j *job, ref string) {
	defer m.wg.Done()
	defer close(j.done)
	defer j.cancel()
	ctx := j.ctx
	select {
	case <-j.urgent:
	case m.sem <- struct{}{}:
		defer func() { <-m.sem }()
	case <-ctx.Done():
		j.err = ctx.Err()
		return
	}
	// Part of the pull: population yields to it.
	end := m.cfg.Lazy.Activity.Begin()
	defer end()
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
		if j.ahead && isNoSpace(j.err) {
			// Not again ahead of containerd: see dropStaged.
			m.mu.Lock()
			m.dropped[j.desc.Digest] = true
			m.mu.Unlock()
		}
		return
	}
	if j.ahead {
		if du, err := fs.DiskUsage(ctx, dir); err == nil {
			j.size = du.Size
		}
	}
	j.dir = dir
	if m.cfg.Metrics != nil {
		m.cfg.Metrics.FullFetch(j.desc.Size, j.elapsed, false)
	}
	log.G(ctx).WithField("bytes", j.desc.Size).WithField("elapsed", j.elapsed.Round(time.Millisecond)).
		Info("layer fetched and unpacked")

	m.mu.Lock()
	defer m.mu.Unlock()
	if j.claimed { // dropped while it ran: nobody can claim it now
		os.RemoveAll(dir)
		j.dir, j.err = "", errors.New("dropped: the disk was full")
		return
	}
	if m.jobs[j.desc.Digest] == j {
		j.expire = time.AfterFunc(m.cfg.StagedTTL, func() { m.expire(j) })
	}
}

// extract streams desc from the registry into dir.
func (m *Manager) extract(ctx context.Context, ref string, desc ocispec.Descriptor, dir string, parents []string) (extract.Result, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rc, err := m.reg.Open(ctx, ref, desc)
	if err != nil {
		return extract.Result{}, classify(err)
	}
	defer rc.Close()
	// A failed extraction stops the stream's Read its read-ahead may be in.
	opts := extract.Options{Digest: desc.Digest, Size: desc.Size, Parents: parents, Abort: func(error) { cancel() }}
	if _, ok := lazy.Capable(desc); ok {
		// An eStargz or zstd:chunked layer fetched in full: its format
		// entries are no more part of the image than when it is lazy.
		opts.HideRoot = lazy.FormatNames()
	}
	res, err := extract.Layer(ctx, rc, dir, opts)
	return res, classify(err)
}

// claim gives j's tree (or error) to the caller, unless another caller
// claimed the tree first. An error can be shared.
func (m *Manager) claim(j *job) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if j.err != nil {
		// A data-loss failure stays, so the bad blob is not fetched
		// again for the next snapshot of the same layer.
		if m.jobs[j.desc.Digest] == j && !errdefs.IsDataLoss(j.err) {
			delete(m.jobs, j.desc.Digest)
		}
		return true
	}
	if j.claimed {
		return false
	}
	j.claimed = true
	if m.jobs[j.desc.Digest] == j {
		delete(m.jobs, j.desc.Digest)
	}
	if j.expire != nil {
		j.expire.Stop()
	}
	return true
}

// staged reports whether j holds (or will hold) a tree fetched ahead that
// nobody claimed. m.mu is held.
func staged(j *job) bool {
	if !j.ahead || j.claimed {
		return false
	}
	select {
	case <-j.done:
		return j.err == nil
	default:
		return true
	}
}

// expire deletes a tree fetched ahead that nobody claimed.
func (m *Manager) expire(j *job) {
	m.mu.Lock()
	if m.jobs[j.desc.Digest] != j || j.claimed {
		m.mu.Unlock()
		return
	}
	delete(m.jobs, j.desc.Digest)
	j.claimed = true
	m.mu.Unlock()
	os.RemoveAll(j.dir)
	log.G(m.ctx).WithField("layer", j.desc.Digest).Info("deleted a layer fetched ahead that containerd did not ask for in time")
}

// dropStaged stops every layer fetched ahead that containerd does not wait
// for and deletes its tree: the disk is full, and they are only a head
// start. containerd fetches them again when it asks for them; until then
// they are not fetched ahead again, so that a full disk does not make the
// same blobs come again and again.
func (m *Manager) dropStaged(ctx context.Context) {
	var dirs []string
	m.mu.Lock()
	for d, j := range m.jobs {
		if !staged(j) {
			continue
		}
		select {
		case <-j.urgent:
			continue
		default:
		}
		delete(m.jobs, d)
		m.dropped[d] = true
		j.claimed = true
		j.cancel()
		if j.expire != nil {
			j.expire.Stop()
		}
		select {
		case <-j.done: // j.dir is set
			dirs = append(dirs, j.dir)
		default: // run deletes its tree when it ends
		}
	}
	m.mu.Unlock()
	for _, d := range dirs {
		os.RemoveAll(d)
	}
	if len(dirs) > 0 {
		log.G(ctx).WithField("layers", len(dirs)).Warn("disk full: deleted the layers fetched ahead")
	}
}

// isNoSpace reports whether err means the disk (or quota) is full.
func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}
