package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"path"
	"slices"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
)

// get sends GET {scheme}://{host}{path}/{repo}/{suffix} to the target's hosts
// in order until one answers 200 or 206, and returns that reply with the name
// of the host that sent it. A round in which some host failed transiently is
// repeated after a backoff, up to Options.Retries rounds; a host that failed
// for good (404, 401, 403, ...) is not asked again. The error wraps
// ErrNotFound if every host answered 404, else ErrUnavailable. The caller
// closes the body.
func (r *Resolver) get(ctx context.Context, t *target, o op, suffix string, hdr http.Header) (*http.Response, string, error) {
	failures := make([]hostFailure, len(t.hosts))
	for attempt := 1; ; attempt++ {
		retry := false
		for i, h := range t.hosts {
			f := &failures[i]
			if f.err != nil && !f.transient {
				continue
			}
			resp, err := r.once(ctx, t, h, suffix, hdr)
			if err == nil {
				return resp, h.Host, nil
			}
			if ctx.Err() != nil {
				return nil, "", fmt.Errorf("%s from %s/%s%s: %w", o.what, h.Host, t.repo, o.detail, ctx.Err())
			}
			*f = hostFailure{host: h.Host, err: err, attempts: f.attempts + 1, transient: isTransient(err)}
			retry = retry || f.transient
		}
		if !retry || attempt >= r.opts.Retries {
			return nil, "", &requestError{op: o, repo: t.repo, failures: failures, kind: failureKind(failures)}
		}
		if err := sleep(ctx, backoff(r.opts.Backoff, attempt)); err != nil {
			return nil, "", fmt.Errorf("%s from %s/%s%s: %w", o.what, t.name, t.repo, o.detail, err)
		}
	}
}

// once sends one request to one host, answering an authorization challenge
// (401) once. Any status but 200 and 206 is an error.
func (r *Resolver) once(ctx context.Context, t *target, h docker.RegistryHost, suffix string, hdr http.Header) (*http.Response, error) {
	u := &url.URL{Scheme: h.Scheme, Host: h.Host, Path: path.Join(h.Path, t.repo, suffix)}
	if isMirror(h, t.name) {
		// Mirrors learn which registry is meant from "ns", as with containerd.
		u.RawQuery = url.Values{"ns": {t.name}}.Encode()
	}
	ctx = docker.WithScope(ctx, "repository:"+t.repo+":pull")
	ctx = context.WithValue(ctx, registryKey{}, t.name)
	return r.call(ctx, h, request{method: http.MethodGet, url: u, header: hdr, auth: true}, http.StatusOK, http.StatusPartialContent)
}

// authorize hands a 401 reply's challenge to the host's authorizer, with the
// credentials for the host that sent it.
func (r *Resolver) authorize(ctx context.Context, h docker.RegistryHost, resp *http.Response) error {
	host := resp.Request.URL.Host
	registry, _ := ctx.Value(registryKey{}).(string)
	if err := r.creds.load(ctx, host, registry); err != nil {
		return &permanentError{fmt.Errorf("HTTP 401, credentials for %s: %w", host, err)}
	}
	if err := h.Authorizer.AddResponses(ctx, []*http.Response{resp}); err != nil {
		return &permanentError{fmt.Errorf("HTTP 401, authorize: %w", authFailure(err))}
	}
	return nil
}

// registryKey is the context key of the registry name a request is for.
type registryKey struct{}

// isMirror reports whether h serves the registry name on its behalf.
func isMirror(h docker.RegistryHost, name string) bool {
	if name == "docker.io" && h.Host == "registry-1.docker.io" {
		return false
	}
	return h.Host != name
}

// watchedBody is a reply body that abandons its request when no byte arrives
// for a while, and counts the bytes it delivers.
type watchedBody struct {
	body    io.ReadCloser
	ctx     context.Context // the request's: its cause tells a stall from other errors
	cancel  context.CancelCauseFunc
	stall   *time.Timer // cancels ctx with errNoProgress when it fires
	timeout time.Duration
	bytes   *atomic.Int64 // the Resolver's byte count
}

func (w *watchedBody) Read(p []byte) (int, error) {
	n, err := w.body.Read(p)
	if n > 0 {
		w.stall.Reset(w.timeout)
		w.bytes.Add(int64(n))
	}
	if err != nil && err != io.EOF {
		err = stallCause(w.ctx, err)
	}
	return n, err
}

func (w *watchedBody) Close() error {
	w.stall.Stop()
	err := w.body.Close()
	w.cancel(nil)
	return err
}

// stallCause returns the stall error instead of err if ctx was canceled for
// making no progress.
func stallCause(ctx context.Context, err error) error {
	if cause := context.Cause(ctx); errors.Is(cause, errNoProgress) {
		return cause
	}
	return err
}

// discard drains a little of resp's body, so that the connection can be
// reused, and closes it.
func discard(resp *http.Response) {
	_, _ = io.CopyN(io.Discard, resp.Body, 4096)
	_ = resp.Body.Close()
}

// backoff returns the wait before attempt+1: base doubled per attempt, capped
// at maxBackoff, with the upper half jittered.
func backoff(base time.Duration, attempt int) time.Duration {
	d := base
	for i := 1; i < attempt && d < maxBackoff; i++ {
		d *= 2
	}
	d = min(d, maxBackoff)
	return d/2 + rand.N(d/2+1)
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// request is one request to a registry host.
type request struct {
	method string
	url    *url.URL
	header http.Header
	body   func() (io.Reader, error) // the body, from its start, at each send; nil for none
	size   int64                     // the body's length
	auth   bool                      // send through the host's authorizer
}

// call sends rq to h and returns the reply if its status is one of want,
// answering an authorization challenge (401) once. Any other status is an
// error, and its reply is drained and closed. The caller closes the body.
func (r *Resolver) call(ctx context.Context, h docker.RegistryHost, rq request, want ...int) (*http.Response, error) {
	for authorized := false; ; authorized = true {
		resp, err := r.sendRequest(ctx, h, rq)
		if err != nil {
			return nil, err
		}
		switch {
		case slices.Contains(want, resp.StatusCode):
			return resp, nil
		case resp.StatusCode == http.StatusUnauthorized && !authorized && rq.auth && h.Authorizer != nil:
			err := r.authorize(ctx, h, resp)
			discard(resp)
			if err != nil {
				return nil, err
			}
		default:
			err := newStatusError(resp)
			discard(resp)
			return nil, err
		}
	}
}

// sendRequest sends rq once. Like send, it abandons the request when it goes
// Options.Timeout without progress: no byte of the request body taken, no
// answer, or no byte of the reply body.
func (r *Resolver) sendRequest(ctx context.Context, h docker.RegistryHost, rq request) (*http.Response, error) {
	rctx, cancel := context.WithCancelCause(ctx)
	stall := time.AfterFunc(r.opts.Timeout, func() {
		cancel(fmt.Errorf("%w for %s", errNoProgress, r.opts.Timeout))
	})
	fail := func(err error) (*http.Response, error) {
		stall.Stop()
		err = stallCause(rctx, err)
		cancel(nil)
		return nil, err
	}
	var body *progressReader
	req, err := http.NewRequestWithContext(rctx, rq.method, rq.url.String(), nil)
	if err != nil {
		return fail(&permanentError{err})
	}
	if rq.body != nil {
		b, err := rq.body()
		if err != nil {
			return fail(err)
		}
		body = &progressReader{r: b, size: rq.size, stall: stall, timeout: r.opts.Timeout}
		// Not the caller's reader itself: the transport closes the body.
		req.Body = io.NopCloser(body)
		req.ContentLength = rq.size
		if rq.size == 0 {
			req.Body = http.NoBody
		}
	}
	for k, v := range h.Header {
		req.Header[k] = slices.Clone(v)
	}
	for k, v := range rq.header {
		req.Header[k] = slices.Clone(v)
	}
	if rq.auth && h.Authorizer != nil {
		r.authMu.Lock()
		err := h.Authorizer.Authorize(rctx, req)
		r.authMu.Unlock()
		if err != nil {
			return fail(fmt.Errorf("authorize: %w", authFailure(err)))
		}
	}
	r.requests.Add(1)
	resp, err := h.Client.Do(req)
	if body != nil {
		body.stop()
		if body.err != nil {
			if err == nil {
				discard(resp)
			}
			return fail(body.err)
		}
	}
	if err != nil {
		if ue, ok := errors.AsType[*url.Error](err); ok && ue.URL == req.URL.String() {
			err = ue.Err
		}
		return fail(err)
	}
	resp.Body = &watchedBody{
		body:    resp.Body,
		ctx:     rctx,
		cancel:  cancel,
		stall:   stall,
		timeout: r.opts.Timeout,
		bytes:   &r.bytes,
	}
	return resp, nil
}
