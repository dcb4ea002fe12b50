package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// PushBlob uploads content as the blob desc to the repository named by ref
// (e.g. "127.0.0.1:5000/foo:latest"; tag and digest in ref are ignored),
// unless the repository has the blob already. Like containerd, it pushes to
// the first host configured for the registry with the push capability: a HEAD
// to see whether the blob is there, then a POST to start an upload and a
// single PUT of the whole content to the upload location. The registry checks
// content against desc.Digest; content must deliver exactly desc.Size bytes.
//
// content is read from its current position and never closed. Transient
// failures (connection errors, stalls, 429, 5xx) restart the push, up to
// Options.Retries attempts; once the PUT has started, that needs content to
// be an io.Seeker (it is sought back to where it began), else the failure is
// final.
//
// Errors name the blob, host and repository. They wrap ErrBadData when the
// registry's reply contradicts the upload (a different digest or size), and
// ErrUnavailable for every other failure: the registry could not be reached,
// refused (401, 403, 404, 400 for a digest that does not match content) or
// kept failing. Invalid arguments give errors wrapping
// errdefs.ErrInvalidArgument.
func (r *Resolver) PushBlob(ctx context.Context, ref string, desc ocispec.Descriptor, content io.Reader) error {
	spec, err := parseRef(ref)
	if err != nil {
		return err
	}
	if err := desc.Digest.Validate(); err != nil {
		return fmt.Errorf("push blob %q to %s: %w: %w", desc.Digest, ref, err, errdefs.ErrInvalidArgument)
	}
	if desc.Size < 0 {
		return fmt.Errorf("push blob %s to %s: negative size %d: %w", desc.Digest, ref, desc.Size, errdefs.ErrInvalidArgument)
	}
	t, h, err := r.pushTarget(ctx, spec)
	if err != nil {
		return fmt.Errorf("push blob %s: %w", desc.Digest, err)
	}
	ctx = docker.WithScope(ctx, pushScope(t.repo))
	body := replayable(content)
	o := op{what: "push blob " + desc.Digest.String()}
	return r.pushRetry(ctx, &t, h, o, func() error {
		return r.pushBlobOnce(ctx, &t, h, desc, body)
	})
}

// PushManifest puts the manifest or index b, of the given media type, into
// the repository named by ref and returns its digest (sha256, or the
// algorithm of a digest in ref). With a tag in ref ("host/repo:tag") the
// manifest is put under that tag; with only a digest ("host/repo@sha256:…")
// under its digest, which must be b's. Every blob and child manifest b refers
// to must be pushed first. Hosts and errors are as for PushBlob; transient
// failures are retried up to Options.Retries attempts.
func (r *Resolver) PushManifest(ctx context.Context, ref, mediaType string, b []byte) (digest.Digest, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return "", err
	}
	tag, dgst, err := splitObject(spec)
	if err != nil {
		return "", err
	}
	if dgst == "" {
		dgst = digest.Canonical.FromBytes(b)
	} else if got := dgst.Algorithm().FromBytes(b); got != dgst {
		return "", fmt.Errorf("push manifest to %s: content has digest %s: %w", ref, got, errdefs.ErrInvalidArgument)
	}
	switch {
	case mediaType == "":
		return "", fmt.Errorf("push manifest %s to %s: no media type: %w", dgst, ref, errdefs.ErrInvalidArgument)
	case len(b) > maxManifestSize:
		return "", fmt.Errorf("push manifest %s to %s: %d bytes, more than %d: %w", dgst, ref, len(b), maxManifestSize, errdefs.ErrInvalidArgument)
	}
	object := tag
	if object == "" {
		object = dgst.String()
	}
	t, h, err := r.pushTarget(ctx, spec)
	if err != nil {
		return "", fmt.Errorf("push manifest %s: %w", dgst, err)
	}
	ctx = docker.WithScope(ctx, pushScope(t.repo))
	o := op{what: "push manifest " + dgst.String()}
	if tag != "" {
		o.what += " as " + tag
	}
	rq := request{
		method: http.MethodPut,
		url:    repoURL(h, &t, "manifests/"+object),
		header: http.Header{"Content-Type": {mediaType}},
		body:   func() (io.Reader, error) { return bytes.NewReader(b), nil },
		size:   int64(len(b)),
		auth:   true,
	}
	err = r.pushRetry(ctx, &t, h, o, func() error {
		resp, err := r.call(ctx, h, rq, http.StatusCreated, http.StatusOK, http.StatusNoContent)
		if err != nil {
			return err
		}
		discard(resp)
		return checkDigestHeader(resp, dgst)
	})
	if err != nil {
		return "", err
	}
	return dgst, nil
}

// pushBlobOnce checks for the blob, then uploads it in one PUT.
func (r *Resolver) pushBlobOnce(ctx context.Context, t *target, h docker.RegistryHost, desc ocispec.Descriptor, body func() (io.Reader, error)) error {
	head := request{method: http.MethodHead, url: repoURL(h, t, "blobs/"+desc.Digest.String()), auth: true}
	resp, err := r.call(ctx, h, head, http.StatusOK, http.StatusNotFound)
	if err != nil {
		return fmt.Errorf("check for blob: %w", err)
	}
	discard(resp)
	if resp.StatusCode == http.StatusOK {
		if resp.ContentLength >= 0 && resp.ContentLength != desc.Size {
			return &badReplyError{fmt.Errorf("check for blob: registry has it with %d bytes, want %d", resp.ContentLength, desc.Size)}
		}
		return nil
	}

	start := request{method: http.MethodPost, url: repoURL(h, t, "blobs/uploads/"), auth: true}
	resp, err = r.call(ctx, h, start, http.StatusAccepted)
	if err != nil {
		return fmt.Errorf("start upload: %w", err)
	}
	discard(resp)
	loc, err := uploadURL(resp)
	if err != nil {
		return &badReplyError{fmt.Errorf("start upload: %w", err)}
	}
	q := loc.Query()
	q.Set("digest", desc.Digest.String())
	if isMirror(h, t.name) && loc.Host == h.Host && q.Get("ns") == "" {
		q.Set("ns", t.name)
	}
	loc.RawQuery = q.Encode()
	// As with containerd, credentials go only where the POST went.
	sent := resp.Request.URL
	put := request{
		method: http.MethodPut,
		url:    loc,
		header: http.Header{"Content-Type": {"application/octet-stream"}},
		body:   body,
		size:   desc.Size,
		auth:   loc.Host == sent.Host && loc.Scheme == sent.Scheme,
	}
	resp, err = r.call(ctx, h, put, http.StatusCreated, http.StatusOK, http.StatusNoContent)
	if err != nil {
		return fmt.Errorf("upload: %w", err)
	}
	discard(resp)
	if err := checkDigestHeader(resp, desc.Digest); err != nil {
		return fmt.Errorf("upload: %w", err)
	}
	return nil
}

// uploadURL returns the absolute upload location a POST was answered with.
func uploadURL(resp *http.Response) (*url.URL, error) {
	loc := resp.Header.Get("Location")
	if loc == "" {
		return nil, errors.New("HTTP 202 without Location")
	}
	u, err := resp.Request.URL.Parse(loc)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("bad Location %q", printable(loc))
	}
	return u, nil
}

// checkDigestHeader fails if the reply reports a digest other than want.
func checkDigestHeader(resp *http.Response, want digest.Digest) error {
	got := digest.Digest(resp.Header.Get("Docker-Content-Digest"))
	if got == "" || got.Validate() != nil || got.Algorithm() != want.Algorithm() || got == want {
		return nil
	}
	return &badReplyError{fmt.Errorf("registry reports digest %s", got)}
}

// pushTarget returns spec's repository with the first host configured to
// push to it: the only host pushes go to.
func (r *Resolver) pushTarget(ctx context.Context, spec reference.Spec) (target, docker.RegistryHost, error) {
	t, err := r.target(ctx, spec, docker.HostCapabilityPull|docker.HostCapabilityResolve|docker.HostCapabilityPush)
	if err != nil {
		return target{}, docker.RegistryHost{}, err
	}
	for _, h := range t.hosts {
		if h.Capabilities&docker.HostCapabilityPush != 0 {
			t.hosts = []docker.RegistryHost{h}
			return t, h, nil
		}
	}
	return target{}, docker.RegistryHost{}, fmt.Errorf("no host configured to push to %s (hosts dir %q): %w", t.name, r.opts.HostsDir, ErrUnavailable)
}

// pushScope is the token scope pushes to repo need.
func pushScope(repo string) string {
	return "repository:" + repo + ":pull,push"
}

// repoURL returns {scheme}://{host}{path}/{repo}/{suffix}, keeping a
// trailing slash of suffix, with the mirror namespace if h is a mirror.
func repoURL(h docker.RegistryHost, t *target, suffix string) *url.URL {
	p := path.Join(h.Path, t.repo, suffix)
	if strings.HasSuffix(suffix, "/") {
		p += "/"
	}
	u := &url.URL{Scheme: h.Scheme, Host: h.Host, Path: p}
	if isMirror(h, t.name) {
		u.RawQuery = url.Values{"ns": {t.name}}.Encode()
	}
	return u
}

// replayable returns a function that gives content from where it began at
// each call: an io.Seeker is sought back; another reader can be given once.
func replayable(content io.Reader) func() (io.Reader, error) {
	calls := 0
	var start int64
	return func() (io.Reader, error) {
		calls++
		s, ok := content.(io.Seeker)
		switch {
		case ok && calls == 1:
			off, err := s.Seek(0, io.SeekCurrent)
			if err != nil {
				return nil, &permanentError{fmt.Errorf("content position: %w", err)}
			}
			start = off
		case ok:
			if _, err := s.Seek(start, io.SeekStart); err != nil {
				return nil, &permanentError{fmt.Errorf("rewind content: %w", err)}
			}
		case calls > 1:
			return nil, &permanentError{errors.New("cannot send content again: not an io.Seeker")}
		}
		return content, nil
	}
}

// pushRetry runs f, one attempt of a push to h, until it succeeds, fails for
// good or has been tried Options.Retries times.
func (r *Resolver) pushRetry(ctx context.Context, t *target, h docker.RegistryHost, o op, f func() error) error {
	for attempt := 1; ; attempt++ {
		err := f()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s to %s/%s: %w", o.what, h.Host, t.repo, ctx.Err())
		}
		if _, ok := errors.AsType[*badReplyError](err); ok {
			return pushError(o, t.repo, h.Host, ErrBadData, err, attempt)
		}
		if !isTransient(err) || attempt >= r.opts.Retries {
			return pushError(o, t.repo, h.Host, ErrUnavailable, err, attempt)
		}
		if err := sleep(ctx, backoff(r.opts.Backoff, attempt)); err != nil {
			return fmt.Errorf("%s to %s/%s: %w", o.what, h.Host, t.repo, err)
		}
	}
}

// pushError reports a failed push: "push blob sha256:… to host/repo: upload:
// HTTP 400 (…): remote: registry unavailable".
func pushError(o op, repo, host string, kind, err error, attempts int) error {
	if attempts > 1 {
		return fmt.Errorf("%s to %s/%s: %w (after %d attempts): %w", o.what, host, repo, err, attempts, kind)
	}
	return fmt.Errorf("%s to %s/%s: %w: %w", o.what, host, repo, err, kind)
}

// badReplyError marks a reply that contradicts the request: the push fails
// with ErrBadData, without retrying.
type badReplyError struct{ err error }

func (e *badReplyError) Error() string { return e.err.Error() }
func (e *badReplyError) Unwrap() error { return e.err }

// progressReader is a request body that holds off its request's stall timer
// while the transport takes bytes from it. Once stopped it reads no more:
// the transport may go on reading a body after the reply came, and by then
// the content may be sought back for the next attempt.
type progressReader struct {
	size    int64 // bytes the content must have
	stall   *time.Timer
	timeout time.Duration

	mu      sync.Mutex // guards the fields below
	r       io.Reader
	n       int64 // bytes read
	err     error // the content is shorter or longer than size: a permanent error
	stopped bool
}

func (p *progressReader) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.err != nil:
		return 0, p.err
	case p.stopped:
		return 0, errClosed
	}
	n, err := p.r.Read(b)
	p.n += int64(n)
	if n > 0 {
		p.stall.Reset(p.timeout)
	}
	switch {
	case p.n > p.size:
		p.err = &permanentError{fmt.Errorf("content is longer than %d bytes", p.size)}
		return 0, p.err
	case err == io.EOF && p.n < p.size:
		p.err = &permanentError{fmt.Errorf("content ended after %d of %d bytes", p.n, p.size)}
		return n, p.err
	case err == nil && p.n == p.size:
		// Look for more before the transport sends the last bytes: once
		// they are sent, the registry may refuse the content (its digest
		// is wrong) before the transport would notice the excess.
		var one [1]byte
		m, perr := io.ReadFull(p.r, one[:])
		if m > 0 {
			p.err = &permanentError{fmt.Errorf("content is longer than %d bytes", p.size)}
			return 0, p.err
		}
		if perr != io.EOF {
			return n, perr
		}
		return n, io.EOF
	}
	return n, err
}

// stop makes later reads fail, once a read in progress has returned. After
// stop, err may be read without the lock.
func (p *progressReader) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopped = true
}
