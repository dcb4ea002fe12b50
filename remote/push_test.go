package remote

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// pushRegistry is an in-memory registry that accepts monolithic blob
// uploads and manifest puts, for one repository at a time.
type pushRegistry struct {
	srv  *httptest.Server
	host string

	mu        sync.Mutex
	blobs     map[digest.Digest][]byte                      // guarded by mu
	manifests map[string]storedManifest                     // guarded by mu: by tag and by digest
	requests  []string                                      // guarded by mu: "METHOD /path", in order
	uploads   int                                           // guarded by mu: upload sessions started
	relative  bool                                          // guarded by mu: answer POST with a relative Location
	fault     func(http.ResponseWriter, *http.Request) bool // guarded by mu: may answer a request itself
}

type storedManifest struct {
	mediaType string
	b         []byte
}

func newPushRegistry(t *testing.T) *pushRegistry {
	t.Helper()
	reg := &pushRegistry{blobs: make(map[digest.Digest][]byte), manifests: make(map[string]storedManifest)}
	reg.srv = httptest.NewServer(http.HandlerFunc(reg.serve))
	t.Cleanup(reg.srv.Close)
	reg.host = strings.TrimPrefix(reg.srv.URL, "http://")
	return reg
}

func (reg *pushRegistry) setFault(f func(http.ResponseWriter, *http.Request) bool) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	reg.fault = f
}

func (reg *pushRegistry) log() []string {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	return append([]string(nil), reg.requests...)
}

func (reg *pushRegistry) blob(d digest.Digest) ([]byte, bool) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	b, ok := reg.blobs[d]
	return b, ok
}

func (reg *pushRegistry) manifest(ref string) (storedManifest, bool) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	m, ok := reg.manifests[ref]
	return m, ok
}

// put stores m under each of refs.
func (reg *pushRegistry) put(m storedManifest, refs ...string) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for _, ref := range refs {
		reg.manifests[ref] = m
	}
}

func registryError(w http.ResponseWriter, status int, code string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"errors":[{"code":%q,"message":"test registry says no"}]}`, code)
}

func (reg *pushRegistry) serve(w http.ResponseWriter, r *http.Request) {
	reg.mu.Lock()
	reg.requests = append(reg.requests, r.Method+" "+r.URL.Path)
	fault, relative := reg.fault, reg.relative
	reg.mu.Unlock()
	if fault != nil && fault(w, r) {
		return
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/v2/")
	if !ok {
		http.NotFound(w, r)
		return
	}
	switch {
	case strings.Contains(rest, "/blobs/uploads/"):
		repo, id, _ := strings.Cut(rest, "/blobs/uploads/")
		reg.serveUpload(w, r, repo, id, relative)
	case strings.Contains(rest, "/blobs/"):
		_, d, _ := strings.Cut(rest, "/blobs/")
		b, ok := reg.blob(digest.Digest(d))
		if !ok {
			registryError(w, http.StatusNotFound, "BLOB_UNKNOWN")
			return
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(b)))
		w.Header().Set("Docker-Content-Digest", d)
		if r.Method == http.MethodGet {
			_, _ = w.Write(b)
		}
	case strings.Contains(rest, "/manifests/"):
		_, ref, _ := strings.Cut(rest, "/manifests/")
		reg.serveManifest(w, r, ref)
	default:
		http.NotFound(w, r)
	}
}

func (reg *pushRegistry) serveUpload(w http.ResponseWriter, r *http.Request, repo, id string, relative bool) {
	switch {
	case r.Method == http.MethodPost && id == "":
		reg.mu.Lock()
		reg.uploads++
		n := reg.uploads
		reg.mu.Unlock()
		loc := fmt.Sprintf("/v2/%s/blobs/uploads/u%d?_state=s%%3D%d", repo, n, n)
		if !relative {
			loc = reg.srv.URL + loc
		}
		w.Header().Set("Location", loc)
		w.WriteHeader(http.StatusAccepted)
	case r.Method == http.MethodPut && id != "":
		if r.URL.Query().Get("_state") != "s="+strings.TrimPrefix(id, "u") {
			registryError(w, http.StatusBadRequest, "BLOB_UPLOAD_INVALID")
			return
		}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		want := digest.Digest(r.URL.Query().Get("digest"))
		if digest.FromBytes(b) != want {
			registryError(w, http.StatusBadRequest, "DIGEST_INVALID")
			return
		}
		reg.mu.Lock()
		reg.blobs[want] = b
		reg.mu.Unlock()
		w.Header().Set("Docker-Content-Digest", want.String())
		w.WriteHeader(http.StatusCreated)
	default:
		registryError(w, http.StatusMethodNotAllowed, "UNSUPPORTED")
	}
}

func (reg *pushRegistry) serveManifest(w http.ResponseWriter, r *http.Request, ref string) {
	switch r.Method {
	case http.MethodPut:
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		d := digest.FromBytes(b)
		if strings.HasPrefix(ref, "sha256:") && digest.Digest(ref) != d {
			registryError(w, http.StatusBadRequest, "DIGEST_INVALID")
			return
		}
		m := storedManifest{mediaType: r.Header.Get("Content-Type"), b: b}
		reg.mu.Lock()
		reg.manifests[ref], reg.manifests[d.String()] = m, m
		reg.mu.Unlock()
		w.Header().Set("Docker-Content-Digest", d.String())
		w.WriteHeader(http.StatusCreated)
	case http.MethodGet, http.MethodHead:
		m, ok := reg.manifest(ref)
		if !ok {
			registryError(w, http.StatusNotFound, "MANIFEST_UNKNOWN")
			return
		}
		w.Header().Set("Content-Type", m.mediaType)
		w.Header().Set("Docker-Content-Digest", digest.FromBytes(m.b).String())
		_, _ = w.Write(m.b)
	default:
		registryError(w, http.StatusMethodNotAllowed, "UNSUPPORTED")
	}
}

// onceReader is a reader that is not an io.Seeker.
type onceReader struct{ io.Reader }

func TestPushBlob(t *testing.T) {
	content := bytes.Repeat([]byte("lazylayer "), 1000)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(content), Size: int64(len(content))}
	for _, relative := range []bool{false, true} {
		t.Run(fmt.Sprintf("relative=%v", relative), func(t *testing.T) {
			reg := newPushRegistry(t)
			reg.mu.Lock()
			reg.relative = relative
			reg.mu.Unlock()
			r := NewResolver(testOptions(t))
			ref := reg.host + "/foo:latest"
			if err := r.PushBlob(t.Context(), ref, desc, bytes.NewReader(content)); err != nil {
				t.Fatal(err)
			}
			if got, _ := reg.blob(desc.Digest); !bytes.Equal(got, content) {
				t.Fatalf("registry has %d bytes, want %d", len(got), len(content))
			}
			// Pushed again, it is only checked for.
			if err := r.PushBlob(t.Context(), ref, desc, onceReader{bytes.NewReader(content)}); err != nil {
				t.Fatal(err)
			}
			want := []string{
				"HEAD /v2/foo/blobs/" + desc.Digest.String(),
				"POST /v2/foo/blobs/uploads/",
				"PUT /v2/foo/blobs/uploads/u1",
				"HEAD /v2/foo/blobs/" + desc.Digest.String(),
			}
			if got := reg.log(); strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Errorf("requests:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		})
	}
}

func TestPushBlobEmpty(t *testing.T) {
	reg := newPushRegistry(t)
	desc := ocispec.Descriptor{Digest: digest.FromBytes(nil), Size: 0}
	if err := NewResolver(testOptions(t)).PushBlob(t.Context(), reg.host+"/foo", desc, bytes.NewReader(nil)); err != nil {
		t.Fatal(err)
	}
	if _, ok := reg.blob(desc.Digest); !ok {
		t.Fatal("empty blob not stored")
	}
}

// TestPushBlobRetries fails the first upload: a seekable content is sent
// again from where it began, other content is not.
func TestPushBlobRetries(t *testing.T) {
	content := []byte("0123456789abcdef")
	desc := ocispec.Descriptor{Digest: digest.FromBytes(content[4:]), Size: int64(len(content) - 4)}
	for _, tc := range []struct {
		name    string
		content func() io.Reader
		ok      bool
	}{
		{"seeker", func() io.Reader { r := bytes.NewReader(content); r.Seek(4, io.SeekStart); return r }, true},
		{"reader", func() io.Reader { return onceReader{bytes.NewReader(content[4:])} }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newPushRegistry(t)
			var puts atomic.Int32
			reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method == http.MethodPut && puts.Add(1) == 1 {
					_, _ = io.Copy(io.Discard, r.Body)
					registryError(w, http.StatusServiceUnavailable, "UNAVAILABLE")
					return true
				}
				return false
			})
			err := NewResolver(testOptions(t)).PushBlob(t.Context(), reg.host+"/foo:latest", desc, tc.content())
			if !tc.ok {
				if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "not an io.Seeker") {
					t.Fatalf("got %v, want ErrUnavailable saying the content cannot be sent again", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := reg.blob(desc.Digest); !bytes.Equal(got, content[4:]) {
				t.Fatalf("registry has %q, want %q", got, content[4:])
			}
			if n := puts.Load(); n != 2 {
				t.Errorf("%d PUTs, want 2", n)
			}
		})
	}
}

func TestPushBlobRefused(t *testing.T) {
	content := []byte("some layer")
	for _, tc := range []struct {
		name  string
		desc  ocispec.Descriptor
		fault func(http.ResponseWriter, *http.Request) bool
		want  error
		msg   string // in the error
		puts  int    // PUT requests expected; -1: not checked
	}{
		{
			name: "wrong digest",
			desc: ocispec.Descriptor{Digest: digest.FromString("other"), Size: int64(len(content))},
			want: ErrUnavailable, msg: "DIGEST_INVALID", puts: 1,
		},
		{
			name: "wrong size",
			desc: ocispec.Descriptor{Digest: digest.FromBytes(content), Size: int64(len(content)) + 1},
			want: ErrUnavailable, msg: "upload: content ended after 10 of 11 bytes", puts: -1,
		},
		{
			name: "too long",
			desc: ocispec.Descriptor{Digest: digest.FromBytes(content), Size: int64(len(content)) - 1},
			want: ErrUnavailable, msg: "upload: content is longer than 9 bytes", puts: -1,
		},
		{
			name: "denied",
			desc: ocispec.Descriptor{Digest: digest.FromBytes(content), Size: int64(len(content))},
			fault: func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method == http.MethodPost {
					registryError(w, http.StatusForbidden, "DENIED")
					return true
				}
				return false
			},
			want: ErrUnavailable, msg: "start upload: HTTP 403 (DENIED", puts: 0,
		},
		{
			name: "no location",
			desc: ocispec.Descriptor{Digest: digest.FromBytes(content), Size: int64(len(content))},
			fault: func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method == http.MethodPost {
					w.WriteHeader(http.StatusAccepted)
					return true
				}
				return false
			},
			want: ErrBadData, msg: "without Location", puts: 0,
		},
		{
			name: "wrong digest reported",
			desc: ocispec.Descriptor{Digest: digest.FromBytes(content), Size: int64(len(content))},
			fault: func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method == http.MethodPut {
					_, _ = io.Copy(io.Discard, r.Body)
					w.Header().Set("Docker-Content-Digest", digest.FromString("x").String())
					w.WriteHeader(http.StatusCreated)
					return true
				}
				return false
			},
			want: ErrBadData, msg: "registry reports digest", puts: 1,
		},
		{
			name: "server errors",
			desc: ocispec.Descriptor{Digest: digest.FromBytes(content), Size: int64(len(content))},
			fault: func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method == http.MethodPut {
					_, _ = io.Copy(io.Discard, r.Body)
					w.WriteHeader(http.StatusInternalServerError)
					return true
				}
				return false
			},
			want: ErrUnavailable, msg: "upload: HTTP 500 (after 3 attempts)", puts: 3,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newPushRegistry(t)
			reg.setFault(tc.fault)
			ref := reg.host + "/foo:latest"
			err := NewResolver(testOptions(t)).PushBlob(t.Context(), ref, tc.desc, bytes.NewReader(content))
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want %v saying %q", err, tc.want, tc.msg)
			}
			prefix := "push blob " + tc.desc.Digest.String() + " to " + reg.host + "/foo: "
			if !strings.HasPrefix(err.Error(), prefix) {
				t.Errorf("error %q does not start with %q", err, prefix)
			}
			puts := 0
			for _, l := range reg.log() {
				if strings.HasPrefix(l, "PUT ") {
					puts++
				}
			}
			if tc.puts >= 0 && puts != tc.puts {
				t.Errorf("%d PUTs, want %d", puts, tc.puts)
			}
		})
	}
}

func TestPushInvalid(t *testing.T) {
	r := NewResolver(testOptions(t))
	ctx := t.Context()
	for name, err := range map[string]error{
		"blob digest": r.PushBlob(ctx, "127.0.0.1:1/foo", ocispec.Descriptor{Digest: "sha256:nope"}, nil),
		"blob size":   r.PushBlob(ctx, "127.0.0.1:1/foo", ocispec.Descriptor{Digest: digest.FromString("a"), Size: -1}, nil),
		"blob ref":    r.PushBlob(ctx, "foo", ocispec.Descriptor{Digest: digest.FromString("a")}, nil),
		"manifest digest": func() error {
			_, err := r.PushManifest(ctx, "127.0.0.1:1/foo@"+digest.FromString("a").String(), ocispec.MediaTypeImageManifest, []byte("b"))
			return err
		}(),
		"manifest media type": func() error {
			_, err := r.PushManifest(ctx, "127.0.0.1:1/foo:latest", "", []byte("b"))
			return err
		}(),
		"manifest tag": func() error {
			_, err := r.PushManifest(ctx, "127.0.0.1:1/foo:a/b", ocispec.MediaTypeImageManifest, []byte("b"))
			return err
		}(),
	} {
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: got %v, want ErrInvalidArgument", name, err)
		}
	}
}

func TestPushManifest(t *testing.T) {
	reg := newPushRegistry(t)
	r := NewResolver(testOptions(t))
	ctx := t.Context()
	_, b := testManifest(t)
	dgst, err := r.PushManifest(ctx, reg.host+"/foo:v1", ocispec.MediaTypeImageManifest, b)
	if err != nil {
		t.Fatal(err)
	}
	if dgst != digest.FromBytes(b) {
		t.Fatalf("digest %s, want %s", dgst, digest.FromBytes(b))
	}
	m, ok := reg.manifest("v1")
	if !ok || !bytes.Equal(m.b, b) || m.mediaType != ocispec.MediaTypeImageManifest {
		t.Fatalf("stored %+v, %v", m, ok)
	}
	desc, err := r.Resolve(ctx, reg.host+"/foo:v1")
	if err != nil {
		t.Fatal(err)
	}
	if want := (ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: dgst, Size: int64(len(b))}); desc.Digest != want.Digest || desc.Size != want.Size || desc.MediaType != want.MediaType {
		t.Errorf("resolved %+v, want %+v", desc, want)
	}

	// By digest, into an index.
	idx := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"manifests":[{"mediaType":%q,"digest":%q,"size":%d}]}`,
		ocispec.MediaTypeImageIndex, ocispec.MediaTypeImageManifest, dgst, len(b))
	idxDigest := digest.FromString(idx)
	got, err := r.PushManifest(ctx, reg.host+"/foo@"+idxDigest.String(), ocispec.MediaTypeImageIndex, []byte(idx))
	if err != nil || got != idxDigest {
		t.Fatalf("push index: %s, %v", got, err)
	}
	if !slicesHas(reg.log(), "PUT /v2/foo/manifests/"+idxDigest.String()) {
		t.Errorf("index not put by digest: %q", reg.log())
	}
	index, err := r.Index(ctx, reg.host+"/foo", idxDigest)
	if err != nil {
		t.Fatal(err)
	}
	if len(index.Manifests) != 1 || index.Manifests[0].Digest != dgst {
		t.Errorf("index %+v", index)
	}
}

func slicesHas(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// TestPushBearerAuth pushes to a registry that wants a token with push scope.
func TestPushBearerAuth(t *testing.T) {
	const user, password, token = "alice", "s3cret", "push-tok"
	reg := newPushRegistry(t)
	auth := &tokenServer{realm: reg.srv.URL + "/token", scope: "repository:foo:pull,push", user: user, password: password, token: token}
	reg.setFault(auth.handle)
	opts := testOptions(t)
	config := fmt.Sprintf(`{"auths":{%q:{"username":%q,"password":%q}}}`, reg.host, user, password)
	if err := os.WriteFile(filepath.Join(opts.DockerConfig, "config.json"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	r := NewResolver(opts)
	content := []byte("layer")
	desc := ocispec.Descriptor{Digest: digest.FromBytes(content), Size: int64(len(content))}
	if err := r.PushBlob(t.Context(), reg.host+"/foo:latest", desc, bytes.NewReader(content)); err != nil {
		t.Fatal(err)
	}
	_, b := testManifest(t)
	if _, err := r.PushManifest(t.Context(), reg.host+"/foo:latest", ocispec.MediaTypeImageManifest, b); err != nil {
		t.Fatal(err)
	}
	if n := auth.issued.Load(); n != 1 {
		t.Errorf("%d tokens issued, want 1", n)
	}
}

// TestPushHosts pushes past a pull-only mirror to the registry itself, and
// refuses when no host may be pushed to.
func TestPushHosts(t *testing.T) {
	upstream, mirror := newPushRegistry(t), newPushRegistry(t)
	hostsDir := t.TempDir()
	writeHostsToml(t, hostsDir, upstream.host, fmt.Sprintf(`server = "http://%s"

[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, upstream.host, mirror.host))
	opts := testOptions(t)
	opts.HostsDir = hostsDir
	r := NewResolver(opts)
	content := []byte("layer")
	desc := ocispec.Descriptor{Digest: digest.FromBytes(content), Size: int64(len(content))}
	if err := r.PushBlob(t.Context(), upstream.host+"/foo:latest", desc, bytes.NewReader(content)); err != nil {
		t.Fatal(err)
	}
	if _, ok := upstream.blob(desc.Digest); !ok || len(mirror.log()) != 0 {
		t.Errorf("upstream has blob: %v; mirror saw %q", ok, mirror.log())
	}

	pullOnly := t.TempDir()
	writeHostsToml(t, pullOnly, upstream.host, fmt.Sprintf(`server = "http://%s"
capabilities = ["pull", "resolve"]
`, upstream.host))
	opts.HostsDir = pullOnly
	err := NewResolver(opts).PushBlob(t.Context(), upstream.host+"/foo:latest", desc, bytes.NewReader(content))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no host configured to push") {
		t.Fatalf("got %v, want ErrUnavailable saying no host may be pushed to", err)
	}
}
