package layer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazylayer/lazylayer/fs/extract"
	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
)

// The states of a lazy layer, as status reports them. The snapshot package
// records only lazy and local.
const (
	stateLazy       = layerstatus.StateLazy
	statePopulating = layerstatus.StatePopulating
	stateLocal      = layerstatus.StateLocal
	stateFailed     = layerstatus.StateFailed
)

// Start implements snapshot.LazyLayer: the layer's snapshot is committed,
// and local records the layer local. Population starts when the Manager's
// Policy says: PopulateDelay from now (then once pulls and on-demand reads
// leave it the link; see lazy.PopulateOptions.Quiet), or when Populate
// releases it; at
// once for a layer whose population an earlier daemon had started, so that
// a restart interrupts it only.
func (ll *Lazy) Start(local func(context.Context) error) {
	m := ll.m
	m.mu.Lock()
	closed := m.closed
	if !closed {
		m.wg.Add(1)
	}
	m.mu.Unlock()
	if closed {
		return
	}
	ll.mu.Lock()
	ll.started = true
	ll.exited = make(chan struct{})
	ll.mu.Unlock()
	if _, err := os.Stat(filepath.Join(ll.dir, lazyReleasedFile)); err == nil {
		ll.release()
	} else if m.cfg.Policy == PolicyAuto {
		t := time.AfterFunc(max(m.cfg.PopulateDelay, 0), ll.release)
		context.AfterFunc(ll.ctx, func() { t.Stop() })
	}
	go func() {
		defer m.wg.Done()
		defer close(ll.exited)
		m.populate(ll, local)
	}()
}

// release lets the layer's population start, and records that it did for
// the next daemon (see Start). A record that cannot be written costs only
// the resumption after a restart of a layer held back by PolicyManual.
func (ll *Lazy) release() {
	ll.mu.Lock()
	first := !ll.released
	if first {
		ll.released = true
		close(ll.begin)
	}
	ll.mu.Unlock()
	if first {
		if err := os.WriteFile(filepath.Join(ll.dir, lazyReleasedFile), nil, 0o600); err != nil {
			log.G(ll.ctx).WithError(err).WithField("layer", ll.desc.Digest).
				Warn("cannot record that population started: a restarted daemon under the manual policy holds it back again")
		}
	}
}

// Populate starts the population of the lazy layers with digest d, or of
// every lazy layer when d is empty, whatever the Policy, and reports how
// many layers it released.
func (m *Manager) Populate(d digest.Digest) int {
	n := 0
	for _, ll := range m.lazyLayers(d) {
		ll.release()
		n++
	}
	return n
}

// WaitLocal waits until the lazy layers with digest d (every lazy layer
// when d is empty) are local. It fails if population of one of them gave
// up, or when ctx is done.
func (m *Manager) WaitLocal(ctx context.Context, d digest.Digest) error {
	var errs []error
	for _, ll := range m.lazyLayers(d) {
		select {
		case <-ll.local:
		case <-ll.failed:
			ll.mu.Lock()
			errs = append(errs, fmt.Errorf("layer %s: %w", ll.desc.Digest, ll.err))
			ll.mu.Unlock()
		case <-ll.ctx.Done(): // released: the layer is gone
		case <-ctx.Done():
			return fmt.Errorf("layer %s is %s: %w", ll.desc.Digest, ll.state.Load(), ctx.Err())
		}
	}
	return errors.Join(errs...)
}

// lazyLayers lists the lazy layers with digest d, or all when d is empty.
func (m *Manager) lazyLayers(d digest.Digest) []*Lazy {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*Lazy
	for _, ll := range m.lazy {
		if d == "" || ll.desc.Digest == d {
			out = append(out, ll)
		}
	}
	return out
}

// populate downloads ll in the background once it is released, verifies
// it and swaps it to a local tree: new containers then mount dir/fs,
// running ones read it through the FUSE mount (with passthrough where
// supported), and the FUSE mount retires once the last overlay using it is
// gone. A blob that proves wrong is downloaded PopulateAttempts times at
// most; other failures (registry down, disk full) are retried with backoff.
func (m *Manager) populate(ll *Lazy, local func(context.Context) error) {
	ctx := log.WithLogger(ll.ctx, log.G(ll.ctx).WithField("layer", ll.desc.Digest))
	select {
	case <-ll.begin:
	case <-ctx.Done():
		return
	}
	bad, noSpace := 0, false
	var staging string
	for backoff := time.Second; ; backoff = min(backoff*2, 5*time.Minute) {
		ll.state.Store(statePopulating)
		var err error
		staging, err = m.populateOnce(ctx, ll, local)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		ll.state.Store(stateLazy)
		lg := log.G(ctx).WithError(err)
		switch {
		case errors.Is(err, extract.ErrDiffID):
			// The blob is the manifest's, but the config names other
			// content, and containerd named the snapshot after the
			// config's diff ID. Fetching again cannot help.
			ll.fail(err)
			lg.Error("population gave up: the image config's diff ID for this layer does not match the layer's content (the blob matched its digest); the layer never turns local")
			return
		case errors.Is(err, extract.ErrInvalid):
			if bad++; bad >= m.cfg.PopulateAttempts {
				ll.fail(fmt.Errorf("the blob failed verification %d times: %w", bad, err))
				lg.WithField("attempts", bad).Error("population gave up: the registry's blob is wrong; the layer stays lazy, served from verified chunks")
				return
			}
			lg.WithField("attempt", bad).Error("layer failed verification after population; fetching it again")
		case isNoSpace(err):
			m.dropStaged(ctx)
			if !noSpace {
				lg.Error("population stopped: the disk is full; the layer stays lazy and population retries with backoff")
			}
			noSpace = true
		default:
			lg.WithField("retry", backoff).Warn("population failed; retrying")
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
	}
	ll.state.Store(stateLocal)
	close(ll.local)
	p := ll.layer.Progress()
	if m.cfg.Metrics != nil {
		m.cfg.Metrics.FullFetch(p.Size, p.Elapsed, true)
	}
	log.G(ctx).WithFields(log.Fields{
		"fetched": p.Fetched, "size": p.Size, "elapsed": p.Elapsed.Round(time.Millisecond),
	}).Info("layer is local")
	if b := ll.layer.Stats().Bound; ll.native && b > 0 {
		log.G(ctx).WithField("files", b).Warn("running containers hold files of this layer bound to its FUSE mount " +
			"(first opened before they were local): they read through the daemon until the kernel evicts them, " +
			"so they need a daemon (a restarted one serves them); every other file reads natively")
	}
	if err := os.RemoveAll(staging); err != nil {
		log.G(ctx).WithError(err).Warn("cannot remove the staging directory of a local layer")
	}
	// Containers that were handed the FUSE mount just before the swap may
	// not have mounted their overlay yet: give them time before detaching.
	select {
	case <-time.After(m.cfg.SwapGrace):
	case <-ctx.Done():
		return // released: Release detaches the mount
	}
	m.retire(ctx, ll)
}

// fail records why population gave up.
func (ll *Lazy) fail(err error) {
	ll.mu.Lock()
	ll.err = err
	ll.mu.Unlock()
	ll.state.Store(stateFailed)
	close(ll.failed)
}

// populateOnce downloads and verifies ll into a staging tree, moves it into
// dir/fs and records the layer local.
//
// On success it returns the staging directory, left for the caller to
// remove once the layer is reported local: what is left in it (the names
// of files now placed, emptied directories) took 0.1 s to remove for
// python's base layer. New clears what a crash leaves there.
func (m *Manager) populateOnce(ctx context.Context, ll *Lazy, local func(context.Context) error) (_ string, err error) {
	staging, err := os.MkdirTemp(m.cfg.Staging, "populate-")
	if err != nil {
		return "", err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(staging)
		}
	}()
	if err := os.Chmod(staging, 0o755); err != nil {
		return "", err
	}
	tree := filepath.Join(ll.dir, "fs")
	o := m.cfg.Populate
	o.DiffID = ll.diffID
	if ll.native {
		if err := ll.layer.PopulateInto(ctx, staging, m.placeDir(ll.dir), o); err != nil {
			return "", err
		}
		if err := m.linkTree(ll.dir); err != nil {
			return "", err
		}
		tree = m.placeDir(ll.dir)
	} else {
		if err := ll.layer.Populate(ctx, staging, o); err != nil {
			return "", err
		}
		// A daemon that died between moving a tree here and recording
		// the layer local left one: a lazy layer's fs/ is in no
		// overlay, so it can go.
		if err := emptyDir(tree); err != nil {
			return "", err
		}
		if err := moveTree(staging, tree); err != nil {
			return "", err
		}
	}
	if err := local(ctx); err != nil {
		// The tree is complete; without the record new containers keep
		// the FUSE mount, which stays correct.
		return "", err
	}
	ll.layer.SetLocal(tree)
	if err := m.cfg.Lazy.Cache.Delete(ll.layer.Chunks()...); err != nil {
		log.G(ctx).WithError(err).Warn("cannot delete the layer's cached chunks")
	}
	if err := ll.layer.DropBlob(); err != nil {
		log.G(ctx).WithError(err).Warn("cannot delete the layer's blob copy")
	}
	// The TOC stays until the FUSE mount retired: a daemon that follows
	// a restart or crash serves the mount's connection with it.
	return staging, nil
}

// retire detaches a local layer's FUSE mount; its server answers the
// overlays still using it and stops when the last is unmounted.
func (m *Manager) retire(ctx context.Context, ll *Lazy) {
	done, err := ll.detach()
	if err != nil {
		log.G(ctx).WithError(err).Warn("cannot detach the FUSE mount of a local layer")
		return
	}
	// A stale lowerdir must fail loudly, not show an empty layer.
	os.Remove(filepath.Join(ll.dir, lazyMount))
	log.G(ctx).Info("FUSE mount detached; it retires when its last container stops")
	select {
	case <-done:
	case <-ctx.Done():
		return
	}
	ll.layer.Close()
	// Reads under way at the swap may have cached chunks after they were
	// deleted; with the server gone, none can come after these.
	if err := m.cfg.Lazy.Cache.Delete(ll.layer.Chunks()...); err != nil {
		log.G(ctx).WithError(err).Warn("cannot delete the layer's cached chunks")
	}
	m.mu.Lock()
	if m.lazy[ll.dir] == ll {
		delete(m.lazy, ll.dir)
	}
	m.mu.Unlock()
	for _, f := range []string{lazyTOCFile, lazyDescFile, lazyReleasedFile} {
		os.Remove(filepath.Join(ll.dir, f))
	}
	log.G(ctx).Info("FUSE mount retired")
}
