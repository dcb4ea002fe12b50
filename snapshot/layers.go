package snapshot

import (
	"context"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
)

// Layer is a committed snapshot holding an image layer the snapshotter
// obtained itself.
type Layer struct {
	Name   string // snapshot name (the chain ID)
	Digest string // blob digest of the layer
	State  string // StateLocal or StateLazy
	Dir    string // the snapshot's directory
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
			layers = append(layers, Layer{
				Name:   info.Name,
				Digest: info.Labels[LabelLayerDigest],
				State:  info.Labels[LabelState],
				Dir:    s.snapshotDir(id),
			})
			return nil
		})
	})
	return layers, err
}
