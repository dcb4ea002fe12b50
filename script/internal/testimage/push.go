package testimage

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Pusher pushes images to a registry. The zero value is ready to use.
type Pusher struct {
	// Client sends the requests; nil means http.DefaultClient.
	Client *http.Client
	// TempDir is where layer blobs are staged; empty means os.TempDir().
	// It needs room for the biggest compressed layer.
	TempDir string
}

// Push builds img and pushes it to the registry at registryAddr (host:port,
// spoken to over plain HTTP; an "http://" prefix is also accepted) as
// repoTag ("name:tag", or "name" for "name:latest"). Layers are built one at
// a time into temporary files and uploaded; blobs the registry already has
// are not uploaded again. It returns the manifest's digest and the layer
// descriptors, bottom first.
func Push(ctx context.Context, registryAddr, repoTag string, img Image) (digest.Digest, []ocispec.Descriptor, error) {
	var p Pusher
	return p.Push(ctx, registryAddr, repoTag, img)
}

// Push is like the package function Push, using p's client and directory.
func (p *Pusher) Push(ctx context.Context, registryAddr, repoTag string, img Image) (digest.Digest, []ocispec.Descriptor, error) {
	repo, tag, err := splitRepoTag(repoTag)
	if err != nil {
		return "", nil, err
	}
	c, err := newClient(p.Client, registryAddr, repo)
	if err != nil {
		return "", nil, err
	}
	dir, err := os.MkdirTemp(p.TempDir, "testimage-")
	if err != nil {
		return "", nil, fmt.Errorf("create staging dir: %w", err)
	}
	defer os.RemoveAll(dir)

	layers := make([]ocispec.Descriptor, len(img.Layers))
	diffIDs := make([]digest.Digest, len(img.Layers))
	for i, l := range img.Layers {
		b, err := buildLayer(ctx, dir, l)
		if err != nil {
			return "", nil, fmt.Errorf("build layer %d: %w", i, err)
		}
		err = c.pushBlob(ctx, b.desc, func() (io.ReadCloser, error) { return os.Open(b.path) })
		os.Remove(b.path)
		if err != nil {
			return "", nil, fmt.Errorf("push layer %d: %w", i, err)
		}
		layers[i], diffIDs[i] = b.desc, b.diffID
	}

	cfg, err := imageConfig(img, diffIDs)
	if err != nil {
		return "", nil, err
	}
	cfgDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
	if err := c.pushBlob(ctx, cfgDesc, bytesOpener(cfg)); err != nil {
		return "", nil, fmt.Errorf("push config: %w", err)
	}
	manifest, err := imageManifest(cfgDesc, layers)
	if err != nil {
		return "", nil, err
	}
	dgst, err := c.pushManifest(ctx, tag, manifest)
	if err != nil {
		return "", nil, err
	}
	return dgst, layers, nil
}

// splitRepoTag splits "name:tag" into name and tag; the tag defaults to
// "latest".
func splitRepoTag(ref string) (repo, tag string, err error) {
	repo, tag = ref, "latest"
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') {
		repo, tag = ref[:i], ref[i+1:]
	}
	if repo == "" || tag == "" || strings.ContainsAny(ref, "@ ") {
		return "", "", fmt.Errorf("bad image reference %q: want name:tag", ref)
	}
	return repo, tag, nil
}

// client speaks the distribution API for one repository.
type client struct {
	http *http.Client
	base *url.URL // http://host:port
	repo string
}

func newClient(hc *http.Client, addr, repo string) (*client, error) {
	if hc == nil {
		hc = http.DefaultClient
	}
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	base, err := url.Parse(addr)
	if err != nil {
		return nil, fmt.Errorf("registry address %q: %w", addr, err)
	}
	if base.Host == "" {
		return nil, fmt.Errorf("registry address %q has no host", addr)
	}
	return &client{http: hc, base: base, repo: repo}, nil
}

func (c *client) url(format string, args ...any) *url.URL {
	u := *c.base
	u.Path = "/v2/" + c.repo + fmt.Sprintf(format, args...)
	return &u
}

func bytesOpener(b []byte) func() (io.ReadCloser, error) {
	return func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
}

// pushBlob uploads the blob desc describes unless the registry has it: a
// HEAD, then a POST to start an upload and one PUT with the whole content.
func (c *client) pushBlob(ctx context.Context, desc ocispec.Descriptor, open func() (io.ReadCloser, error)) error {
	resp, err := c.do(ctx, http.MethodHead, c.url("/blobs/%s", desc.Digest), nil, -1, "")
	if err != nil {
		return err
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		return nil
	case http.StatusNotFound:
	default:
		return fmt.Errorf("HEAD blob %s: status %s", desc.Digest, resp.Status)
	}

	resp, err = c.do(ctx, http.MethodPost, c.url("/blobs/uploads/"), nil, 0, "")
	if err != nil {
		return err
	}
	if err := expect(resp, http.StatusAccepted, "start upload"); err != nil {
		return err
	}
	loc, err := c.base.Parse(resp.Header.Get("Location"))
	if err != nil || resp.Header.Get("Location") == "" {
		return fmt.Errorf("start upload: bad Location %q", resp.Header.Get("Location"))
	}
	q := loc.Query()
	q.Set("digest", desc.Digest.String())
	loc.RawQuery = q.Encode()

	body, err := open()
	if err != nil {
		return fmt.Errorf("open blob %s: %w", desc.Digest, err)
	}
	defer body.Close()
	resp, err = c.do(ctx, http.MethodPut, loc, body, desc.Size, "application/octet-stream")
	if err != nil {
		return err
	}
	return expect(resp, http.StatusCreated, fmt.Sprintf("upload blob %s", desc.Digest))
}

// pushManifest puts an OCI image manifest under tag and returns its digest,
// checked against the one the registry reports.
func (c *client) pushManifest(ctx context.Context, tag string, manifest []byte) (digest.Digest, error) {
	dgst := digest.FromBytes(manifest)
	resp, err := c.do(ctx, http.MethodPut, c.url("/manifests/%s", tag), bytes.NewReader(manifest), int64(len(manifest)), ocispec.MediaTypeImageManifest)
	if err != nil {
		return "", err
	}
	if err := expect(resp, http.StatusCreated, "put manifest"); err != nil {
		return "", err
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != "" && got != dgst.String() {
		return "", fmt.Errorf("put manifest: registry reports digest %s, want %s", got, dgst)
	}
	return dgst, nil
}

// do sends one request. size is the body's length (-1: no body).
func (c *client) do(ctx context.Context, method string, u *url.URL, body io.Reader, size int64, contentType string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, u.Path, err)
	}
	if size >= 0 {
		req.ContentLength = size
		if size == 0 {
			req.Body = http.NoBody
		}
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, u.Path, err)
	}
	return resp, nil
}

// expect closes resp's body and fails unless its status is want; the error
// quotes the start of the registry's answer.
func expect(resp *http.Response, want int, what string) error {
	defer resp.Body.Close()
	if resp.StatusCode == want {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return nil
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	return fmt.Errorf("%s: status %s: %s", what, resp.Status, bytes.TrimSpace(msg))
}
