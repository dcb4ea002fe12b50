package remote

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// testRegistry is a minimal distribution-spec registry serving blobs and
// manifests from memory, with a hook to misbehave.
type testRegistry struct {
	srv  *httptest.Server
	host string // "127.0.0.1:port"

	mu        sync.Mutex
	blobs     map[digest.Digest][]byte // guarded by mu
	manifests map[digest.Digest][]byte // guarded by mu
	requests  []seenRequest            // guarded by mu: every request, in order
	seen      map[string]int           // guarded by mu: requests per URL path and Range
	// misbehave, if set, may answer a request itself (returning true). It
	// gets the number of earlier requests with the same path and Range.
	misbehave func(w http.ResponseWriter, r *http.Request, seen int) bool // guarded by mu
}

func newRegistry(t *testing.T) *testRegistry {
	t.Helper()
	return newRegistryWith(t, nil)
}

// newRegistryWith is newRegistry with configure, if not nil, called on
// the server before it starts.
func newRegistryWith(t *testing.T, configure func(*http.Server)) *testRegistry {
	t.Helper()
	reg := &testRegistry{
		blobs:     make(map[digest.Digest][]byte),
		manifests: make(map[digest.Digest][]byte),
		seen:      make(map[string]int),
	}
	reg.srv = httptest.NewUnstartedServer(http.HandlerFunc(reg.serve))
	if configure != nil {
		configure(reg.srv.Config)
	}
	reg.srv.Start()
	t.Cleanup(reg.srv.Close)
	reg.host = strings.TrimPrefix(reg.srv.URL, "http://")
	return reg
}

func (reg *testRegistry) setMisbehave(f func(w http.ResponseWriter, r *http.Request, seen int) bool) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	reg.misbehave = f
}

// addBlob stores n random bytes and returns them with their descriptor.
func (reg *testRegistry) addBlob(n int) ([]byte, ocispec.Descriptor) {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.N(256))
	}
	d := digest.FromBytes(b)
	reg.mu.Lock()
	defer reg.mu.Unlock()
	reg.blobs[d] = b
	return b, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: d, Size: int64(n)}
}

// addManifest stores b under dgst (which may be wrong on purpose).
func (reg *testRegistry) addManifest(dgst digest.Digest, b []byte) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	reg.manifests[dgst] = b
}

// blobRequests returns the Range headers of the blob requests served so far.
func (reg *testRegistry) blobRequests() []string {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	var ranges []string
	for _, r := range reg.requests {
		if strings.Contains(r.path, "/blobs/") {
			ranges = append(ranges, r.rng)
		}
	}
	return ranges
}

// seenRequest is what the registry keeps of a request.
type seenRequest struct {
	path, query, rng, auth string
}

func (reg *testRegistry) allRequests() []seenRequest {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	return append([]seenRequest(nil), reg.requests...)
}

func (reg *testRegistry) serve(w http.ResponseWriter, r *http.Request) {
	reg.mu.Lock()
	key := r.URL.Path + " " + r.Header.Get("Range")
	seen := reg.seen[key]
	reg.seen[key]++
	reg.requests = append(reg.requests, seenRequest{
		path: r.URL.Path, query: r.URL.RawQuery, rng: r.Header.Get("Range"), auth: r.Header.Get("Authorization"),
	})
	misbehave := reg.misbehave
	reg.mu.Unlock()
	if misbehave != nil && misbehave(w, r, seen) {
		return
	}
	kind, dgst, ok := splitPath(r.URL.Path)
	if !ok {
		http.NotFound(w, r)
		return
	}
	reg.mu.Lock()
	var b []byte
	switch kind {
	case "blobs":
		b, ok = reg.blobs[dgst]
	case "manifests":
		b, ok = reg.manifests[dgst]
	}
	reg.mu.Unlock()
	if !ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, `{"errors":[{"code":"%s_UNKNOWN","message":"not here"}]}`, strings.ToUpper(kind[:len(kind)-1]))
		return
	}
	if kind == "manifests" {
		var m struct {
			MediaType string `json:"mediaType"`
		}
		_ = json.Unmarshal(b, &m)
		w.Header().Set("Content-Type", m.MediaType)
	}
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(b))
}

// splitPath splits /v2/<repo>/<kind>/<digest>.
func splitPath(p string) (kind string, dgst digest.Digest, ok bool) {
	for _, kind := range []string{"blobs", "manifests"} {
		if _, d, found := strings.Cut(p, "/"+kind+"/"); found && strings.HasPrefix(p, "/v2/") {
			return kind, digest.Digest(d), true
		}
	}
	return "", "", false
}

// serveIgnoringRange answers with the whole blob b and status 200.
func serveIgnoringRange(w http.ResponseWriter, b []byte) {
	w.Header().Set("Content-Length", fmt.Sprint(len(b)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
}

// requestedRange parses the request's "bytes=a-b" Range header.
func requestedRange(t *testing.T, r *http.Request) (first, last int64) {
	if _, err := fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &first, &last); err != nil {
		t.Errorf("Range %q: %v", r.Header.Get("Range"), err)
	}
	return first, last
}

// testOptions are Options with small ranges and retries fast enough for tests.
func testOptions(t *testing.T) Options {
	return Options{
		RangeSize:   1024,
		Concurrency: 3,
		Retries:     3,
		Backoff:     time.Millisecond,
		Timeout:     5 * time.Second,
		// Keep tests away from the user's credentials.
		DockerConfig: t.TempDir(),
	}
}

// closedAddr returns an address on which nothing listens.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// writeHostsToml writes root/<host dir>/hosts.toml for the registry name.
func writeHostsToml(t *testing.T, root, name, content string) {
	t.Helper()
	dir := filepath.Join(root, strings.Replace(name, ":", "_", 1)+"_")
	if !strings.Contains(name, ":") {
		dir = filepath.Join(root, name)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
