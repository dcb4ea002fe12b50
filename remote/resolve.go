package remote

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Resolve returns the descriptor of the image manifest or index that ref
// names: "host/repo:tag", "host/repo@sha256:…" or "host/repo:tag@sha256:…"
// (the digest wins). The manifest is fetched with a GET from the hosts
// configured for the registry: for a tag, those with the resolve capability;
// for a digest, those with pull or resolve. Its digest is computed from the
// bytes received (sha256 for a tag) and, when ref has a digest, must equal it.
//
// The descriptor's media type is the manifest's own mediaType field, else the
// reply's Content-Type, else what the content looks like; it is one of the OCI
// and docker schema 2 manifest and index types. A reference without tag or
// digest gives an error wrapping errdefs.ErrInvalidArgument; content that does
// not match the digest, does not decode, or has another media type gives one
// wrapping ErrBadData; a manifest that cannot be fetched gives one wrapping
// ErrUnavailable, or ErrNotFound if the registry does not have it. Errors
// name ref.
func (r *Resolver) Resolve(ctx context.Context, ref string) (ocispec.Descriptor, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	tag, dgst, err := splitObject(spec)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	object, caps := tag, docker.HostCapabilityResolve
	if dgst != "" {
		object, caps = dgst.String(), docker.HostCapabilityPull|docker.HostCapabilityResolve
	}
	if object == "" {
		return ocispec.Descriptor{}, fmt.Errorf("resolve %s: reference has no tag or digest: %w", ref, errdefs.ErrInvalidArgument)
	}
	t, err := r.target(ctx, spec, caps)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("resolve %s: %w", ref, err)
	}
	o := op{what: "resolve " + ref}
	b, contentType, host, err := r.readManifest(ctx, &t, o, object)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if dgst == "" {
		dgst = digest.Canonical.FromBytes(b)
	} else if got := dgst.Algorithm().FromBytes(b); got != dgst {
		return ocispec.Descriptor{}, newError(o, t.repo, host, ErrBadData, fmt.Errorf("content has digest %s", got), 1)
	}
	mediaType, err := manifestMediaType(b, contentType)
	if err != nil {
		return ocispec.Descriptor{}, newError(o, t.repo, host, ErrBadData, err, 1)
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: dgst, Size: int64(len(b))}, nil
}

// Index fetches the image index dgst from the repository named by ref (the
// tag is ignored), verifies its bytes against dgst and decodes it. An empty
// dgst takes the digest in ref. OCI indexes and docker manifest lists are
// accepted; an image manifest is an error wrapping errdefs.ErrInvalidArgument.
// Bytes that do not match dgst or do not decode give an error wrapping
// ErrBadData; an index that cannot be fetched gives one wrapping
// ErrUnavailable, or ErrNotFound if the registry does not have it.
func (r *Resolver) Index(ctx context.Context, ref string, dgst digest.Digest) (ocispec.Index, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return ocispec.Index{}, err
	}
	if dgst == "" {
		dgst = spec.Digest()
	}
	if err := dgst.Validate(); err != nil {
		return ocispec.Index{}, fmt.Errorf("index digest %q for %s: %w: %w", dgst, ref, err, errdefs.ErrInvalidArgument)
	}
	t, err := r.target(ctx, spec, docker.HostCapabilityPull|docker.HostCapabilityResolve)
	if err != nil {
		return ocispec.Index{}, err
	}
	o := op{what: "fetch index " + dgst.String()}
	b, host, err := r.fetchManifest(ctx, &t, o, dgst)
	if err != nil {
		return ocispec.Index{}, err
	}
	if got := dgst.Algorithm().FromBytes(b); got != dgst {
		return ocispec.Index{}, newError(o, t.repo, host, ErrBadData, fmt.Errorf("content has digest %s", got), 1)
	}
	idx, err := decodeIndex(b)
	if errors.Is(err, errdefs.ErrInvalidArgument) {
		return ocispec.Index{}, fmt.Errorf("%s from %s/%s: %w", o.what, host, t.repo, err)
	}
	if err != nil {
		return ocispec.Index{}, newError(o, t.repo, host, ErrBadData, err, 1)
	}
	return idx, nil
}

// splitObject returns the tag and the digest of spec's object, either of
// which may be empty.
func splitObject(spec reference.Spec) (string, digest.Digest, error) {
	tag, dgst, _ := strings.Cut(spec.Object, "@")
	if tag != "" && !validTag(tag) {
		return "", "", fmt.Errorf("reference %s: invalid tag %q: %w", spec.String(), tag, errdefs.ErrInvalidArgument)
	}
	if dgst == "" {
		return tag, "", nil
	}
	d := digest.Digest(dgst)
	if err := d.Validate(); err != nil {
		return "", "", fmt.Errorf("reference %s: digest: %w: %w", spec.String(), err, errdefs.ErrInvalidArgument)
	}
	return tag, d, nil
}

// validTag reports whether tag follows the distribution spec's grammar,
// [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}.
func validTag(tag string) bool {
	if len(tag) == 0 || len(tag) > 128 || tag[0] == '.' || tag[0] == '-' {
		return false
	}
	for _, c := range []byte(tag) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-'
		if !ok {
			return false
		}
	}
	return true
}

// readManifest reads manifests/<object> (a tag or a digest) and returns its
// bytes and Content-Type, retrying when the body breaks.
func (r *Resolver) readManifest(ctx context.Context, t *target, o op, object string) ([]byte, string, string, error) {
	hdr := http.Header{"Accept": {manifestAccept}}
	for attempt := 1; ; attempt++ {
		resp, host, err := r.get(ctx, t, o, "manifests/"+object, hdr)
		if err != nil {
			return nil, "", "", err
		}
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
		_ = resp.Body.Close()
		switch {
		case err == nil && resp.StatusCode != http.StatusOK:
			return nil, "", "", newError(o, t.repo, host, ErrBadData, fmt.Errorf("HTTP %d to a request without Range", resp.StatusCode), 1)
		case err == nil && len(b) > maxManifestSize:
			return nil, "", "", newError(o, t.repo, host, ErrBadData, fmt.Errorf("manifest larger than %d bytes", maxManifestSize), 1)
		case err == nil:
			return b, resp.Header.Get("Content-Type"), host, nil
		case ctx.Err() != nil:
			return nil, "", "", fmt.Errorf("%s from %s/%s: %w", o.what, host, t.repo, ctx.Err())
		case attempt >= r.opts.Retries || !isTransient(err):
			return nil, "", "", newError(o, t.repo, host, ErrUnavailable, fmt.Errorf("read body: %w", err), attempt)
		}
		if err := sleep(ctx, backoff(r.opts.Backoff, attempt)); err != nil {
			return nil, "", "", fmt.Errorf("%s from %s/%s: %w", o.what, host, t.repo, err)
		}
	}
}

// isManifestType reports whether mt is an image manifest media type that
// Manifest decodes.
func isManifestType(mt string) bool {
	return mt == ocispec.MediaTypeImageManifest || mt == mediaTypeDockerManifest
}

// isIndexType reports whether mt is an image index media type that Index
// decodes.
func isIndexType(mt string) bool {
	return mt == ocispec.MediaTypeImageIndex || mt == mediaTypeDockerList
}

// manifestMediaType returns the media type of the manifest or index b, from
// its mediaType field, the reply's Content-Type, or its shape, in that order.
func manifestMediaType(b []byte, contentType string) (string, error) {
	var m struct {
		MediaType     string          `json:"mediaType"`
		SchemaVersion int             `json:"schemaVersion"`
		Config        json.RawMessage `json:"config"`
		Manifests     json.RawMessage `json:"manifests"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return "", fmt.Errorf("decode manifest: %w", err)
	}
	mt := m.MediaType
	if ct, _, err := mime.ParseMediaType(contentType); mt == "" && err == nil && (isManifestType(ct) || isIndexType(ct)) {
		mt = ct
	}
	switch {
	case mt == "" && m.Manifests != nil:
		mt = ocispec.MediaTypeImageIndex
	case mt == "" && m.Config != nil:
		mt = ocispec.MediaTypeImageManifest
	}
	if !isManifestType(mt) && !isIndexType(mt) {
		return "", fmt.Errorf("unsupported manifest media type %q", printable(mt))
	}
	if m.SchemaVersion != 2 {
		return "", fmt.Errorf("unsupported schemaVersion %d", m.SchemaVersion)
	}
	return mt, nil
}

// decodeIndex decodes an OCI image index or docker manifest list and checks
// its descriptors. A manifest is an error wrapping errdefs.ErrInvalidArgument.
func decodeIndex(b []byte) (ocispec.Index, error) {
	var idx struct {
		ocispec.Index
		Config json.RawMessage `json:"config"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return ocispec.Index{}, fmt.Errorf("decode index: %w", err)
	}
	switch {
	case isManifestType(idx.MediaType) || (idx.MediaType == "" && idx.Config != nil):
		return ocispec.Index{}, fmt.Errorf("is an image manifest, not an index: %w", errdefs.ErrInvalidArgument)
	case idx.MediaType != "" && !isIndexType(idx.MediaType):
		return ocispec.Index{}, fmt.Errorf("decode index: unsupported media type %q", printable(idx.MediaType))
	case idx.SchemaVersion != 2:
		return ocispec.Index{}, fmt.Errorf("decode index: unsupported schemaVersion %d", idx.SchemaVersion)
	}
	for i, d := range idx.Manifests {
		if err := checkDescriptor(d); err != nil {
			return ocispec.Index{}, fmt.Errorf("decode index: manifest %d: %w", i, err)
		}
	}
	return idx.Index, nil
}
