package layer

import (
	"context"
	"fmt"
	"io"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/remote"
)

// FromResolver adapts a remote.Resolver to the Registry a Manager needs.
func FromResolver(r *remote.Resolver) Registry {
	return resolverRegistry{r}
}

type resolverRegistry struct {
	*remote.Resolver
}

func (r resolverRegistry) Open(ctx context.Context, ref string, desc ocispec.Descriptor) (io.ReadCloser, error) {
	b, err := r.Blob(ctx, ref, desc)
	if err != nil {
		return nil, fmt.Errorf("open layer %s of %s: %w", desc.Digest, ref, err)
	}
	return b.Stream(ctx), nil
}

func (r resolverRegistry) Ranges(ctx context.Context, ref string, desc ocispec.Descriptor) (lazy.Blob, error) {
	b, err := r.Blob(ctx, ref, desc)
	if err != nil {
		return nil, fmt.Errorf("open layer %s of %s: %w", desc.Digest, ref, err)
	}
	return b, nil
}
