package remote

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestReadRange(t *testing.T) {
	const size = 5000
	for _, ignoreRange := range []bool{false, true} {
		reg := newRegistry(t)
		blob, desc := reg.addBlob(size)
		if ignoreRange {
			reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
				serveIgnoringRange(w, blob)
				return true
			})
		}
		b, err := NewResolver(testOptions(t)).Blob(t.Context(), reg.host+"/foo:latest", desc)
		if err != nil {
			t.Fatal(err)
		}
		for _, rg := range [][2]int64{{0, 1}, {0, size}, {size - 1, 1}, {1000, 2500}, {size, 0}} {
			t.Run(fmt.Sprintf("ignoreRange=%v/%d+%d", ignoreRange, rg[0], rg[1]), func(t *testing.T) {
				rc, err := b.ReadRange(t.Context(), rg[0], rg[1])
				if err != nil {
					t.Fatal(err)
				}
				defer rc.Close()
				got, err := io.ReadAll(rc)
				if err != nil {
					t.Fatal(err)
				}
				if want := blob[rg[0] : rg[0]+rg[1]]; !bytes.Equal(got, want) {
					t.Fatalf("got %d bytes, want %d (equal prefix %d)", len(got), len(want), commonPrefix(got, want))
				}
			})
		}
		for _, rg := range [][2]int64{{-1, 1}, {0, size + 1}, {size, 1}, {1, -1}} {
			if _, err := b.ReadRange(t.Context(), rg[0], rg[1]); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("ReadRange(%d, %d) = %v, want ErrInvalidArgument", rg[0], rg[1], err)
			}
		}
	}
}

func TestReadRangeNotFound(t *testing.T) {
	reg := newRegistry(t)
	_, desc := reg.addBlob(10)
	desc.Digest = digest.Digest("sha256:" + strings.Repeat("0", 64))
	b, err := NewResolver(testOptions(t)).Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.ReadRange(t.Context(), 0, 10)
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "HTTP 404 (BLOB_UNKNOWN: not here)") {
		t.Fatalf("got %v, want ErrNotFound naming the 404", err)
	}
	if reqs := len(reg.blobRequests()); reqs != 1 {
		t.Errorf("registry saw %d requests for a missing blob, want 1", reqs)
	}
}

func TestBlobInvalid(t *testing.T) {
	r := NewResolver(testOptions(t))
	good := ocispec.Descriptor{Digest: digest.Digest("sha256:" + strings.Repeat("a", 64)), Size: 1}
	for _, tc := range []struct {
		ref  string
		desc ocispec.Descriptor
	}{
		{"127.0.0.1:5000/foo", ocispec.Descriptor{Digest: good.Digest, Size: 0}},
		{"127.0.0.1:5000/foo", ocispec.Descriptor{Digest: "sha256:abc", Size: 1}},
		{"127.0.0.1:5000", good},
		{"http://127.0.0.1:5000/foo", good},
	} {
		if _, err := r.Blob(t.Context(), tc.ref, tc.desc); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Blob(%q, %v) = %v, want ErrInvalidArgument", tc.ref, tc.desc, err)
		}
	}
}

func TestUnreachable(t *testing.T) {
	addr := closedAddr(t)
	desc := ocispec.Descriptor{Digest: digest.Digest("sha256:" + strings.Repeat("a", 64)), Size: 3000}
	r := NewResolver(testOptions(t))
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	b, err := r.Blob(ctx, addr+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	s := b.Stream(ctx)
	defer s.Close()
	_, err = io.ReadAll(s)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("Stream: got %v, want ErrUnavailable naming the refused connection", err)
	}
	if _, err := b.ReadRange(ctx, 10, 10); !errors.Is(err, ErrUnavailable) {
		t.Errorf("ReadRange: got %v, want ErrUnavailable", err)
	}
	if _, err := r.Manifest(ctx, addr+"/foo:latest", desc.Digest); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Manifest: got %v, want ErrUnavailable", err)
	}
}

func TestStall(t *testing.T) {
	reg := newRegistry(t)
	blob, desc := reg.addBlob(3000)
	var bodyStalls atomic.Int32
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		first, last := requestedRange(t, r)
		switch {
		case first == 0: // never answers
		case first == 1024 && seen == 0: // answers, then stalls half-way
			bodyStalls.Add(1)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(blob)))
			w.Header().Set("Content-Length", fmt.Sprint(last-first+1))
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(blob[first : first+10])
			w.(http.Flusher).Flush()
		default:
			return false
		}
		<-r.Context().Done()
		return true
	})
	opts := testOptions(t)
	opts.Timeout = 100 * time.Millisecond
	opts.Retries = 2
	b, err := NewResolver(opts).Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}

	rc, err := b.ReadRange(t.Context(), 1024, 1024)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, blob[1024:2048]) {
		t.Errorf("ReadRange after a stalled body: got %d bytes, %v", len(got), err)
	}
	if bodyStalls.Load() != 1 {
		t.Errorf("%d stalled bodies, want 1", bodyStalls.Load())
	}

	_, err = b.ReadRange(t.Context(), 0, 10)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no progress for 100ms (after 2 attempts)") {
		t.Errorf("ReadRange from a stalled registry: got %v, want ErrUnavailable naming the stall", err)
	}
}

// TestRedirect follows a registry that sends blob reads to storage on another
// host: the Range header must reach the storage.
func TestRedirect(t *testing.T) {
	reg := newRegistry(t)
	blob, desc := reg.addBlob(3000)
	var ranged, unranged atomic.Int32
	storage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") == "" {
			unranged.Add(1)
		} else {
			ranged.Add(1)
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(blob))
	}))
	t.Cleanup(storage.Close)
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		http.Redirect(w, r, storage.URL+"/data?sig=x", http.StatusTemporaryRedirect)
		return true
	})
	b, err := NewResolver(testOptions(t)).Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	if got := readStream(t, b); !bytes.Equal(got, blob) {
		t.Fatalf("got %d bytes, want %d", len(got), len(blob))
	}
	if ranged.Load() != 3 || unranged.Load() != 0 {
		t.Errorf("storage saw %d ranged and %d unranged requests, want 3 and 0", ranged.Load(), unranged.Load())
	}
}

func TestMirror(t *testing.T) {
	upstream := closedAddr(t)
	mirror := newRegistry(t)
	blob, desc := mirror.addBlob(3000)
	mdgst, mbytes := testManifest(t, desc)
	mirror.addManifest(mdgst, mbytes)
	hostsDir := t.TempDir()
	writeHostsToml(t, hostsDir, upstream, fmt.Sprintf(`server = "http://%s"

[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, upstream, mirror.host))
	opts := testOptions(t)
	opts.HostsDir = hostsDir
	r := NewResolver(opts)
	ref := upstream + "/foo:latest"

	if _, err := r.Manifest(t.Context(), ref, mdgst); err != nil {
		t.Fatal(err)
	}
	b, err := r.Blob(t.Context(), ref, desc)
	if err != nil {
		t.Fatal(err)
	}
	if got := readStream(t, b); !bytes.Equal(got, blob) {
		t.Fatalf("got %d bytes, want %d", len(got), len(blob))
	}
	reqs := mirror.allRequests()
	if len(reqs) != 4 {
		t.Errorf("mirror saw %d requests, want 4 (a manifest, 3 ranges)", len(reqs))
	}
	for _, req := range reqs {
		if q, _ := url.ParseQuery(req.query); q.Get("ns") != upstream {
			t.Errorf("mirror request %s has query %q, want ns=%s", req.path, req.query, upstream)
		}
	}
}

// TestMirrorFallback asks a mirror that lacks the blob, then the registry.
func TestMirrorFallback(t *testing.T) {
	upstream, mirror := newRegistry(t), newRegistry(t)
	blob, desc := upstream.addBlob(3000)
	hostsDir := t.TempDir()
	writeHostsToml(t, hostsDir, upstream.host, fmt.Sprintf(`server = "http://%s"

[host."http://%s"]
  capabilities = ["pull"]
`, upstream.host, mirror.host))
	opts := testOptions(t)
	opts.HostsDir = hostsDir
	b, err := NewResolver(opts).Blob(t.Context(), upstream.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	if got := readStream(t, b); !bytes.Equal(got, blob) {
		t.Fatalf("got %d bytes, want %d", len(got), len(blob))
	}
	if m, u := len(mirror.blobRequests()), len(upstream.blobRequests()); m != 3 || u != 3 {
		t.Errorf("mirror saw %d requests and upstream %d, want 3 each", m, u)
	}
}

// tokenServer is a registry's bearer-token authentication in tests: its
// token endpoint gives token to user:password for scope (HTTP basic on GET,
// a password grant on POST), and every other request needs that token.
type tokenServer struct {
	realm, scope, user, password, token string
	issued                              atomic.Int32
}

// handle answers r if authentication is what it is about or lacks.
func (s *tokenServer) handle(w http.ResponseWriter, r *http.Request) bool {
	if r.URL.Path == "/token" {
		u, p, ok := r.BasicAuth()
		if r.Method == http.MethodPost {
			u, p, ok = r.PostFormValue("username"), r.PostFormValue("password"), r.PostFormValue("grant_type") == "password"
		}
		if !ok || u != s.user || p != s.password || r.FormValue("scope") != s.scope {
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		s.issued.Add(1)
		_ = json.NewEncoder(w).Encode(map[string]string{"token": s.token, "access_token": s.token})
		return true
	}
	if r.Header.Get("Authorization") != "Bearer "+s.token {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s",service="test",scope="%s"`, s.realm, s.scope))
		w.WriteHeader(http.StatusUnauthorized)
		return true
	}
	return false
}

func TestBearerAuth(t *testing.T) {
	const user, password, token = "alice", "s3cret", "tok-123"
	for _, tc := range []struct {
		name   string
		config string // config.json, with HOST for the registry
		ok     bool
	}{
		{"auth", `{"auths":{"HOST":{"auth":"` + base64.StdEncoding.EncodeToString([]byte(user+":"+password)) + `"}}}`, true},
		{"username", `{"auths":{"http://HOST/v2/":{"username":"alice","password":"s3cret"}}}`, true},
		{"wrong password", `{"auths":{"HOST":{"username":"alice","password":"guess"}}}`, false},
		{"no credentials", `{}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newRegistry(t)
			blob, desc := reg.addBlob(3000)
			auth := &tokenServer{realm: reg.srv.URL + "/token", scope: "repository:foo:pull", user: user, password: password, token: token}
			reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool { return auth.handle(w, r) })
			opts := testOptions(t)
			config := strings.ReplaceAll(tc.config, "HOST", reg.host)
			if err := os.WriteFile(filepath.Join(opts.DockerConfig, "config.json"), []byte(config), 0o600); err != nil {
				t.Fatal(err)
			}
			b, err := NewResolver(opts).Blob(t.Context(), reg.host+"/foo:latest", desc)
			if err != nil {
				t.Fatal(err)
			}
			s := b.Stream(t.Context())
			defer s.Close()
			got, err := io.ReadAll(s)
			if !tc.ok {
				if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "401") {
					t.Fatalf("got %v, want ErrUnavailable naming the 401", err)
				}
				return
			}
			if err != nil || !bytes.Equal(got, blob) {
				t.Fatalf("got %d bytes, %v; want %d bytes", len(got), err, len(blob))
			}
			if n := auth.issued.Load(); n != 1 {
				t.Errorf("%d tokens issued, want 1 (cached for all ranges)", n)
			}
		})
	}
}

// TestHostsEdited: an edit of hosts.toml applies to the next request, as in
// containerd, without a new Resolver.
func TestHostsEdited(t *testing.T) {
	first, second := newRegistry(t), newRegistry(t)
	blob, desc := first.addBlob(3000)
	second.mu.Lock()
	second.blobs[desc.Digest] = blob
	second.mu.Unlock()
	upstream := closedAddr(t)
	hostsDir := t.TempDir()
	point := func(to string) {
		writeHostsToml(t, hostsDir, upstream, fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\"]\n", to, to))
	}
	point(first.host)
	opts := testOptions(t)
	opts.HostsDir = hostsDir
	r := NewResolver(opts)
	ref := upstream + "/foo:latest"
	for i, reg := range []*testRegistry{first, second} {
		if i == 1 {
			point(second.host)
		}
		b, err := r.Blob(t.Context(), ref, desc)
		if err != nil {
			t.Fatal(err)
		}
		if got := readStream(t, b); !bytes.Equal(got, blob) {
			t.Fatalf("got %d bytes, want %d", len(got), len(blob))
		}
		if n := len(reg.blobRequests()); n == 0 {
			t.Errorf("after pointing hosts.toml at registry %d, it saw no request", i+1)
		}
	}
}

// frozenAddr returns the address of a registry that is frozen (as with
// SIGSTOP): the kernel accepts TCP connections into the listen backlog, and
// nothing ever answers.
func frozenAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l.Addr().String()
}

// TestTimeoutFrozenRegistry: Options.Timeout abandons a request to a
// registry that accepted the connection and never answers, and each retry
// gets the same bound.
func TestTimeoutFrozenRegistry(t *testing.T) {
	opts := testOptions(t)
	opts.Timeout = 200 * time.Millisecond
	opts.Retries = 3
	desc := ocispec.Descriptor{Digest: digest.Digest("sha256:" + strings.Repeat("a", 64)), Size: 3000}
	b, err := NewResolver(opts).Blob(t.Context(), frozenAddr(t)+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = b.ReadRange(t.Context(), 0, 10)
	elapsed := time.Since(start)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no progress for 200ms (after 3 attempts)") {
		t.Errorf("ReadRange from a frozen registry: got %v, want ErrUnavailable naming the stall", err)
	}
	// Without Options.Timeout only the transport's own timeouts (10s for
	// a TLS handshake, none for an answer) would end an attempt. The
	// bound tells the two apart with room for a busy machine; it is not
	// a speed target.
	if limit := 3*opts.Timeout + 5*time.Second; elapsed > limit {
		t.Errorf("ReadRange from a frozen registry took %v, want at most %v", elapsed, limit)
	}
}

// TestContextBoundsRequests: a caller's deadline bounds a request as a
// whole, whatever the Resolver's own retries and timeouts would allow:
// connecting, waiting for an answer, reading the body, and the backoff
// between attempts.
func TestContextBoundsRequests(t *testing.T) {
	const deadline = 500 * time.Millisecond
	reg := newRegistry(t)
	blob, desc := reg.addBlob(3000)
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		if r.Header.Get("Range") == "" {
			return false
		}
		first, last := requestedRange(t, r)
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(blob)))
		w.Header().Set("Content-Length", fmt.Sprint(last-first+1))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(blob[first : first+10])
		w.(http.Flusher).Flush()
		<-r.Context().Done() // the body stalls
		return true
	})
	for _, tc := range []struct {
		name string
		host string
	}{
		{"refused", closedAddr(t)},
		{"frozen", frozenAddr(t)},
		{"body stalls", reg.host},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// 30s without progress per attempt, as by default, and more
			// attempts than the deadline leaves time for.
			r := NewResolver(Options{DockerConfig: t.TempDir(), Retries: 100})
			b, err := r.Blob(t.Context(), tc.host+"/foo:latest", desc)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(t.Context(), deadline)
			defer cancel()
			start := time.Now()
			rc, err := b.ReadRange(ctx, 0, 1000)
			if err == nil {
				_, err = io.ReadAll(rc)
				rc.Close()
			}
			elapsed := time.Since(start)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("got %v, want the deadline's error", err)
			}
			// Without the deadline the Resolver would give up after 30s
			// without progress per attempt, or minutes of retries. The
			// bound tells the two apart with room for a busy machine
			// (the race detector on 2 busy cores took 1.7s); it is not a
			// speed target.
			if elapsed > deadline+5*time.Second {
				t.Errorf("returned after %v, the deadline was %v", elapsed, deadline)
			}
		})
	}
}

// TestNotFoundOnEveryHost: a request that every host answers with 404
// fails with ErrNotFound, saying the 404 once for the hosts that gave it;
// if a host could not be reached, the content may be there: ErrUnavailable.
func TestNotFoundOnEveryHost(t *testing.T) {
	reg := newRegistry(t)
	refused := closedAddr(t)
	for _, tc := range []struct {
		name     string
		mirror   string
		kind     error
		contains []string
	}{
		{"mirror is the registry", reg.host, ErrNotFound,
			[]string{"resolve " + reg.host + "/foo:nope from " + reg.host + "/foo: HTTP 404 (MANIFEST_UNKNOWN: not here): remote: not found"}},
		{"mirror refuses", refused, ErrUnavailable,
			[]string{"from " + refused + "/foo: dial tcp", "; from " + reg.host + "/foo: HTTP 404 (MANIFEST_UNKNOWN: not here)", "remote: registry unavailable"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hostsDir := t.TempDir()
			writeHostsToml(t, hostsDir, reg.host, fmt.Sprintf(`server = "http://%s"

[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, reg.host, tc.mirror))
			opts := testOptions(t)
			opts.HostsDir = hostsDir
			_, err := NewResolver(opts).Resolve(t.Context(), reg.host+"/foo:nope")
			if !errors.Is(err, tc.kind) {
				t.Fatalf("got %v, want %v", err, tc.kind)
			}
			for _, s := range tc.contains {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
			// "HTTP 404", not "404": a random port may hold those digits.
			if n := strings.Count(err.Error(), "HTTP 404"); n != 1 {
				t.Errorf("error %q names the 404 %d times", err, n)
			}
		})
	}
}
