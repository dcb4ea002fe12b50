package remote

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

const (
	// maxManifestSize bounds the manifest body read into memory.
	maxManifestSize = 4 << 20

	mediaTypeDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"

	// manifestAccept lists indexes too, so that asking for an index by
	// mistake gives a clear error rather than a 404.
	manifestAccept = ocispec.MediaTypeImageManifest + ", " + mediaTypeDockerManifest + ", " +
		ocispec.MediaTypeImageIndex + ", " + mediaTypeDockerList
)

// Manifest fetches the image manifest dgst from the repository named by ref
// (e.g. "127.0.0.1:5000/foo:latest"; the tag is ignored), verifies its bytes
// against dgst and decodes it. An empty dgst takes the digest in ref. OCI and
// docker schema 2 manifests are accepted; an image index is an error wrapping
// errdefs.ErrInvalidArgument. Bytes that do not match dgst or do not decode
// give an error wrapping ErrBadData; a manifest that cannot be fetched gives
// one wrapping ErrUnavailable, or ErrNotFound if the registry does not have
// it.
func (r *Resolver) Manifest(ctx context.Context, ref string, dgst digest.Digest) (ocispec.Manifest, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return ocispec.Manifest{}, err
	}
	if dgst == "" {
		dgst = spec.Digest()
	}
	if err := dgst.Validate(); err != nil {
		return ocispec.Manifest{}, fmt.Errorf("manifest digest %q for %s: %w: %w", dgst, ref, err, errdefs.ErrInvalidArgument)
	}
	// Manifests are fetched by digest and verified, so any host that may be
	// pulled from may serve them, as with containerd's fetcher.
	t, err := r.target(ctx, spec, docker.HostCapabilityPull|docker.HostCapabilityResolve)
	if err != nil {
		return ocispec.Manifest{}, err
	}
	o := op{what: "fetch manifest " + dgst.String()}
	b, host, err := r.fetchManifest(ctx, &t, o, dgst)
	if err != nil {
		return ocispec.Manifest{}, err
	}
	if got := dgst.Algorithm().FromBytes(b); got != dgst {
		return ocispec.Manifest{}, newError(o, t.repo, host, ErrBadData, fmt.Errorf("content has digest %s", got), 1)
	}
	m, err := decodeManifest(b)
	if errors.Is(err, errdefs.ErrInvalidArgument) {
		return ocispec.Manifest{}, fmt.Errorf("%s from %s/%s: %w", o.what, host, t.repo, err)
	}
	if err != nil {
		return ocispec.Manifest{}, newError(o, t.repo, host, ErrBadData, err, 1)
	}
	return m, nil
}

// fetchManifest reads the manifest's bytes, retrying when the body breaks.
func (r *Resolver) fetchManifest(ctx context.Context, t *target, o op, dgst digest.Digest) ([]byte, string, error) {
	hdr := http.Header{"Accept": {manifestAccept}}
	for attempt := 1; ; attempt++ {
		resp, host, err := r.get(ctx, t, o, "manifests/"+dgst.String(), hdr)
		if err != nil {
			return nil, "", err
		}
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
		_ = resp.Body.Close()
		switch {
		case err == nil && resp.StatusCode != http.StatusOK:
			return nil, "", newError(o, t.repo, host, ErrBadData, fmt.Errorf("HTTP %d to a request without Range", resp.StatusCode), 1)
		case err == nil && len(b) > maxManifestSize:
			return nil, "", newError(o, t.repo, host, ErrBadData, fmt.Errorf("manifest larger than %d bytes", maxManifestSize), 1)
		case err == nil:
			return b, host, nil
		case ctx.Err() != nil:
			return nil, "", fmt.Errorf("%s from %s/%s: %w", o.what, host, t.repo, ctx.Err())
		case attempt >= r.opts.Retries || !isTransient(err):
			return nil, "", newError(o, t.repo, host, ErrUnavailable, fmt.Errorf("read body: %w", err), attempt)
		}
		if err := sleep(ctx, backoff(r.opts.Backoff, attempt)); err != nil {
			return nil, "", fmt.Errorf("%s from %s/%s: %w", o.what, host, t.repo, err)
		}
	}
}

// decodeManifest decodes an OCI or docker schema 2 image manifest and checks
// its descriptors. An index is an error wrapping errdefs.ErrInvalidArgument.
func decodeManifest(b []byte) (ocispec.Manifest, error) {
	var m struct {
		ocispec.Manifest
		Manifests []json.RawMessage `json:"manifests"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return ocispec.Manifest{}, fmt.Errorf("decode manifest: %w", err)
	}
	switch {
	case m.MediaType == ocispec.MediaTypeImageIndex || m.MediaType == mediaTypeDockerList || m.Manifests != nil:
		return ocispec.Manifest{}, fmt.Errorf("is an image index, not a manifest: %w", errdefs.ErrInvalidArgument)
	case m.MediaType != "" && m.MediaType != ocispec.MediaTypeImageManifest && m.MediaType != mediaTypeDockerManifest:
		return ocispec.Manifest{}, fmt.Errorf("decode manifest: unsupported media type %q", printable(m.MediaType))
	case m.SchemaVersion != 2:
		return ocispec.Manifest{}, fmt.Errorf("decode manifest: unsupported schemaVersion %d", m.SchemaVersion)
	}
	if err := checkDescriptor(m.Config); err != nil {
		return ocispec.Manifest{}, fmt.Errorf("decode manifest: config: %w", err)
	}
	for i, l := range m.Layers {
		if err := checkDescriptor(l); err != nil {
			return ocispec.Manifest{}, fmt.Errorf("decode manifest: layer %d: %w", i, err)
		}
	}
	return m.Manifest, nil
}

func checkDescriptor(d ocispec.Descriptor) error {
	if err := d.Digest.Validate(); err != nil {
		return err
	}
	if d.Size < 0 {
		return fmt.Errorf("negative size %d", d.Size)
	}
	return nil
}
