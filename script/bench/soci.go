package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/awslabs/soci-snapshotter/soci"
	socistore "github.com/awslabs/soci-snapshotter/soci/store"
	"github.com/containerd/containerd/v2/core/content"
	ctrimages "github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// tagSOCI is the gzip image with a SOCI index (index manifest v2) built by
// soci-snapshotter's library, as `soci convert` makes it: an OCI index
// holding the image manifest, annotated with the SOCI index's digest, and
// the SOCI index; the layers are the gzip image's own.
const tagSOCI = "soci"

// sociConvert makes registry/repo:tagSOCI from registry/repo:tagGzip with
// soci-snapshotter's IndexBuilder.Convert and its default settings (4 MiB
// spans, no zTOC for layers under 10 MiB), working in dir, and returns the
// digest of the OCI index it pushed and the bytes of its SOCI artifacts.
func sociConvert(ctx context.Context, regAddr, repo, dir string) (string, int64, error) {
	if err := os.RemoveAll(dir); err != nil {
		return "", 0, err
	}
	defer os.RemoveAll(dir)
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		return "", 0, err
	}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts)),
	})
	src := regAddr + "/" + repo + ":" + tagGzip
	name, desc, err := resolver.Resolve(ctx, src)
	if err != nil {
		return "", 0, fmt.Errorf("resolve %s: %w", src, err)
	}
	fetcher, err := resolver.Fetcher(ctx, name)
	if err != nil {
		return "", 0, err
	}
	if err := ctrimages.Dispatch(ctx, ctrimages.Handlers(remotes.FetchHandler(cs, fetcher), ctrimages.ChildrenHandler(cs)), nil, desc); err != nil {
		return "", 0, fmt.Errorf("fetch %s: %w", src, err)
	}
	db, err := soci.NewDB(filepath.Join(dir, "artifacts.db"))
	if err != nil {
		return "", 0, err
	}
	b, err := soci.NewIndexBuilder(cs, blobStore{cs}, soci.WithArtifactsDb(db))
	if err != nil {
		return "", 0, err
	}
	out, err := b.Convert(ctx, ctrimages.Image{Name: name, Target: desc}, soci.ConvertWithNoGarbageCollectionLabels())
	if err != nil {
		return "", 0, fmt.Errorf("soci convert %s: %w", src, err)
	}
	dst := regAddr + "/" + repo + ":" + tagSOCI
	pusher, err := resolver.Pusher(ctx, dst)
	if err != nil {
		return "", 0, err
	}
	if err := remotes.PushContent(ctx, pusher, *out, cs, nil, platforms.All, nil); err != nil {
		return "", 0, fmt.Errorf("push %s: %w", dst, err)
	}
	extra, err := sociArtifactBytes(ctx, cs, *out)
	if err != nil {
		return "", 0, err
	}
	return out.Digest.String(), extra, nil
}

// sociArtifactBytes adds up the SOCI index manifests in the OCI index idx
// and the blobs (zTOCs) each lists.
func sociArtifactBytes(ctx context.Context, cs content.Store, idx ocispec.Descriptor) (int64, error) {
	var index ocispec.Index
	b, err := content.ReadBlob(ctx, cs, idx)
	if err != nil {
		return 0, err
	}
	if err := json.Unmarshal(b, &index); err != nil {
		return 0, fmt.Errorf("decode the SOCI image's index: %w", err)
	}
	var n int64
	for _, d := range index.Manifests {
		if d.ArtifactType != soci.SociIndexArtifactTypeV2 {
			continue
		}
		var m ocispec.Manifest
		b, err := content.ReadBlob(ctx, cs, d)
		if err != nil {
			return 0, err
		}
		if err := json.Unmarshal(b, &m); err != nil {
			return 0, fmt.Errorf("decode SOCI index %s: %w", d.Digest, err)
		}
		n += d.Size
		for _, l := range m.Layers {
			n += l.Size
		}
	}
	if n == 0 {
		return 0, errors.New("the SOCI image's index lists no SOCI index")
	}
	return n, nil
}

// blobStore is soci's store.Store over a containerd content store, so the
// zTOCs, the SOCI index and the new manifests land beside the image's
// blobs and one push sends them all. Labels are for garbage collection,
// which a temporary store does not have.
type blobStore struct{ cs content.Store }

func (s blobStore) Exists(ctx context.Context, d ocispec.Descriptor) (bool, error) {
	_, err := s.cs.Info(ctx, d.Digest)
	if errdefs.IsNotFound(err) {
		return false, nil
	}
	return err == nil, err
}

func (s blobStore) Fetch(ctx context.Context, d ocispec.Descriptor) (io.ReadCloser, error) {
	ra, err := s.cs.ReaderAt(ctx, d)
	if err != nil {
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{content.NewReader(ra), ra}, nil
}

func (s blobStore) Push(ctx context.Context, d ocispec.Descriptor, r io.Reader) error {
	err := content.WriteBlob(ctx, s.cs, "soci-"+d.Digest.String(), r, d)
	if errdefs.IsAlreadyExists(err) {
		return nil
	}
	return err
}

func (blobStore) Label(context.Context, ocispec.Descriptor, string, string) error { return nil }

func (s blobStore) Delete(ctx context.Context, d digest.Digest) error { return s.cs.Delete(ctx, d) }

func (blobStore) BatchOpen(ctx context.Context) (context.Context, socistore.CleanupFunc, error) {
	return ctx, socistore.NopCleanup, nil
}

var _ socistore.Store = blobStore{}

// ensureSOCI makes repo:tagSOCI unless the registry holds the one the
// cache says was made from the current gzip image.
func ensureSOCI(ctx context.Context, o options, reg registryClient, img benchImage, rec *pushedImage) error {
	if got, err := reg.manifestDigest(ctx, img.repo(), tagSOCI); err != nil {
		return err
	} else if got != "" && got == rec.SOCI && rec.SOCIFrom == rec.Digest {
		return nil
	}
	start := time.Now()
	dgst, extra, err := sociConvert(ctx, reg.addr, img.repo(), filepath.Join(o.work, "soci-"+img.name))
	if err != nil {
		return err
	}
	if dgst == "" {
		return errors.New("soci convert pushed nothing")
	}
	rec.SOCI, rec.SOCIFrom, rec.SOCIArtifacts = dgst, rec.Digest, extra
	logf("image %s: SOCI index built and pushed in %s", img.name, time.Since(start).Round(time.Second))
	return nil
}
