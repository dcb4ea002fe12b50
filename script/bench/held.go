package main

import (
	"context"
	"fmt"
	"time"

	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
)

// What a held mode measures (issue 9, "every container ends native"): the
// container started lazily, while every layer is still lazy and again once
// population was released and every layer is local. While lazy only
// metadata is read (find): reading file data would fetch it.

// measureHeld runs find, cold and warm, in the lazy container cid while
// m holds population, and records which layers the daemon calls native.
func (b *bench) measureHeld(ctx context.Context, st *stack, m mode, cid string, s *sample) error {
	for _, cache := range []string{"cold", "warm"} {
		if err := b.timed(ctx, st, m, cid, steadyKey("held", "find", cache), findScript, 1, s); err != nil {
			return err
		}
	}
	r, err := statusReport(ctx, st)
	if err != nil {
		return err
	}
	for _, l := range r.Layers {
		if l.State == layerstatus.StateLocal {
			return fmt.Errorf("layer %s turned local while population was held", l.Digest)
		}
		if l.Native {
			s.NativeLayers++
		}
	}
	return nil
}

// release starts the population of every lazy layer and waits until they
// are local, as `lazylayer populate --all --wait` does.
func release(ctx context.Context, st *stack) error {
	ctx, cancel := context.WithTimeout(ctx, pullTimeout)
	defer cancel()
	r, err := layerstatus.NewClient(layerstatus.Address(st.lazySock)).Populate(ctx, "", true)
	if err != nil {
		return fmt.Errorf("release population: %w", err)
	}
	if r.Error != "" {
		return fmt.Errorf("release population: %s", r.Error)
	}
	return nil
}

func statusReport(ctx context.Context, st *stack) (layerstatus.Report, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	r, err := layerstatus.NewClient(layerstatus.Address(st.lazySock)).Layers(ctx, false)
	if err != nil {
		return r, fmt.Errorf("lazylayer status: %w", err)
	}
	return r, nil
}

// allLocal reports whether r holds at least layers layers and all of them
// are local.
func allLocal(r layerstatus.Report, layers int) bool {
	if len(r.Layers) < layers {
		return false
	}
	for _, l := range r.Layers {
		if l.State != layerstatus.StateLocal {
			return false
		}
	}
	return true
}

// fuseCount is what the daemon's layers' FUSE mounts answered so far.
type fuseCount struct {
	byLayer map[string]int64
	// counted is false when the daemon does not count FUSE requests
	// (before native metadata, the field is there but always 0): no layer
	// is native and none answered a request, which a lazy container's
	// start alone makes impossible for a daemon that counts.
	counted bool
}

// since returns the requests answered between from and c. A layer that
// went away in between counts nothing.
func (c fuseCount) since(from fuseCount) int64 {
	var n int64
	for d, v := range c.byLayer {
		n += max(0, v-from.byLayer[d])
	}
	return n
}

func fuseRequests(ctx context.Context, st *stack) (fuseCount, error) {
	r, err := statusReport(ctx, st)
	if err != nil {
		return fuseCount{}, err
	}
	c := fuseCount{byLayer: map[string]int64{}}
	for _, l := range r.Layers {
		// A layer may be listed twice (a snapshot and its mount).
		c.byLayer[l.Digest+" "+l.Snapshot] = l.FUSERequests
		c.counted = c.counted || l.Native || l.FUSERequests > 0
	}
	return c, nil
}

// fuseBound sums the files running containers hold bound to FUSE.
func fuseBound(ctx context.Context, st *stack) (int64, error) {
	r, err := statusReport(ctx, st)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, l := range r.Layers {
		n += l.FUSEBound
	}
	return n, nil
}
