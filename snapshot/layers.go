package snapshot

import (
	"context"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
)

// Layer is a committed snapshot holding an image layer the snapshotter
// obtained itself.
type Layer struct {
	Name   string // snapshot name (the chain ID)
	Digest string // blob digest of the layer
	State  State
	Dir    string // the snapshot's directory
	// Unavailable says why a lazy layer could not be served again after
	// a restart; it is then being obtained again.
	Unavailable string
}

// Layers lists the layers the snapshotter obtained itself.
func (s *Snapshotter) Layers(ctx context.Context) ([]Layer, error) {
	var layers []Layer
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind != snapshots.KindCommitted || info.Labels[LabelLayerDigest] == "" {
				return nil
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			l := Layer{
				Name:   info.Name,
				Digest: info.Labels[LabelLayerDigest],
				State:  State(info.Labels[LabelState]),
				Dir:    s.snapshotDir(id),
			}
			s.mu.Lock()
			if h := s.held[id]; h != nil && h.ready != nil {
				l.Unavailable = h.why.Error()
			}
			s.mu.Unlock()
			layers = append(layers, l)
			return nil
		})
	})
	if errdefs.IsNotFound(err) { // a new metastore has no buckets yet
		return nil, nil
	}
	return layers, err
}
