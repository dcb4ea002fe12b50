package lazy

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/remote"
)

// testRegistry serves one blob by ranged GETs, as a registry does, and
// counts what it serves.
type testRegistry struct {
	srv      *httptest.Server
	host     string
	data     []byte
	requests atomic.Int64 // blob requests
	served   atomic.Int64 // body bytes written
	missing  atomic.Bool  // answer 404, as for a blob deleted from the registry
}

func newTestRegistry(t *testing.T, data []byte) *testRegistry {
	t.Helper()
	reg := &testRegistry{data: data}
	reg.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.Contains(r.URL.Path, "/blobs/") {
			http.NotFound(w, r)
			return
		}
		reg.requests.Add(1)
		if reg.missing.Load() {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}`))
			return
		}
		http.ServeContent(&countingWriter{ResponseWriter: w, n: &reg.served}, r, "", time.Time{}, bytes.NewReader(reg.data))
	}))
	t.Cleanup(reg.srv.Close)
	reg.host = strings.TrimPrefix(reg.srv.URL, "http://")
	return reg
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w *countingWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.n.Add(int64(n))
	return n, err
}

// remoteBlob returns the blob desc at host through remote with its default
// options: its own retries and per-request timeouts, as the daemon has them.
func remoteBlob(t *testing.T, host string, desc ocispec.Descriptor) Blob {
	t.Helper()
	r := remote.NewResolver(remote.Options{DockerConfig: t.TempDir()})
	t.Cleanup(r.CloseIdleConnections)
	b, err := r.Blob(context.Background(), host+"/test/layer:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// frozenRegistry returns the address of a registry that is frozen (as with
// SIGSTOP): the kernel accepts its TCP connections, and it never answers.
func frozenRegistry(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Nothing calls Accept: connections wait in the listen backlog, and
	// closing the listener resets them.
	t.Cleanup(func() { l.Close() })
	return l.Addr().String()
}

// stoppedRegistry returns the address of a registry that is stopped:
// connections are refused.
func stoppedRegistry(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// waitFor runs f and returns its error and how long it took, or fails the
// test if f has not returned within limit (f is then left to finish).
func waitFor(t *testing.T, limit time.Duration, f func() error) (time.Duration, error) {
	t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		done <- f()
	}()
	t.Cleanup(wg.Wait)
	select {
	case err := <-done:
		return time.Since(start), err
	case <-time.After(limit):
		t.Fatalf("still blocked after %v", limit)
		return 0, nil
	}
}
