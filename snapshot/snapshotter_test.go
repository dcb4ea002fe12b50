package snapshot

import (
	"context"
	"os"
	"testing"

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
