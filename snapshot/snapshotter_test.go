package snapshot

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
)

// TestConformance runs containerd's snapshotter conformance suite against the
// snapshotter. It needs root and overlayfs.
func TestConformance(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("containerd's snapshotter suite needs root (overlay mounts)")
	}
	// The suite keys overlay-specific expectations (no directory rename
	// across layers without redirect_dir) on the name "overlayfs".
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := New(ctx, root)
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}

// TestCleanupDuringPrepare: containerd calls Cleanup after its garbage
// collection while containers start. Cleanup, run again and again while
// snapshots are prepared, removes no directory of a snapshot being made
// or made: each prepared snapshot's upper directory is there afterwards.
func TestCleanupDuringPrepare(t *testing.T) {
	ctx := context.Background()
	sn, err := New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	stop := make(chan struct{})
	cleaned := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				cleaned <- nil
				return
			default:
			}
			if err := sn.Cleanup(ctx); err != nil {
				cleaned <- err
				return
			}
		}
	}()
	for i := range 200 {
		key := fmt.Sprintf("active-%d", i)
		ms, err := sn.Prepare(ctx, key, "")
		if err != nil {
			t.Fatalf("prepare %s while Cleanup runs: %v", key, err)
		}
		if upper := upperDirOf(ms); upper == "" {
			t.Fatalf("prepare %s: no upper directory in %v", key, ms)
		} else if _, err := os.Stat(upper); err != nil {
			t.Fatalf("prepare %s while Cleanup runs: %v", key, err)
		}
	}
	close(stop)
	if err := <-cleaned; err != nil {
		t.Fatalf("cleanup: %v", err)
	}
}

// upperDirOf returns the upper directory of mounts: overlay's upperdir, or
// a bind mount's source.
func upperDirOf(ms []mount.Mount) string {
	for _, m := range ms {
		for _, o := range m.Options {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok {
				return v
			}
		}
		if m.Type == "bind" {
			return m.Source
		}
	}
	return ""
}
