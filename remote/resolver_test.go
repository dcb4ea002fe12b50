package remote

import (
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// noGoroutinesBut waits until no goroutine is running but those opts
// ignore, for up to 10s (goleak's own retries are short for a busy
// machine), and fails the test if some still are.
func noGoroutinesBut(t *testing.T, opts ...goleak.Option) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := goleak.Find(opts...)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCloseIdleConnections: CloseIdleConnections closes the connections a
// Resolver keeps alive, also to a registry on 127.0.0.1, which containerd
// reaches through its HTTPS-to-HTTP fallback.
func TestCloseIdleConnections(t *testing.T) {
	reg := newRegistry(t)
	blob, desc := reg.addBlob(3000)
	// The registry's goroutines are the test's; the connection is the
	// Resolver's.
	ignore := goleak.IgnoreCurrent()
	r := NewResolver(testOptions(t))
	b, err := r.Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := b.ReadRange(t.Context(), 0, int64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(rc); err != nil {
		t.Fatal(err)
	}
	rc.Close() // the connection goes back to the Resolver's pool
	r.CloseIdleConnections()
	noGoroutinesBut(t, ignore)
}

// TestConnectionsReused: the connections of a burst of parallel reads are
// kept for the next burst, not only two of them (Go's default, which
// containerd's transport keeps), so a second burst opens none.
func TestConnectionsReused(t *testing.T) {
	var opened atomic.Int64
	reg := newRegistryWith(t, func(s *http.Server) {
		s.ConnState = func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				opened.Add(1)
			}
		}
	})
	blob, desc := reg.addBlob(64 << 10)
	r := NewResolver(testOptions(t))
	t.Cleanup(r.CloseIdleConnections)
	b, err := r.Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	const parallel = 8
	// Every read of a burst waits until all have their reply headers, so
	// the burst holds parallel connections at once.
	burst := func() {
		var started, wg sync.WaitGroup
		started.Add(parallel)
		release := make(chan struct{})
		errs := make(chan error, parallel)
		for i := range parallel {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rc, err := b.ReadRange(t.Context(), int64(i)*1024, 1024)
				started.Done()
				if err != nil {
					errs <- err
					return
				}
				defer rc.Close()
				<-release
				got, err := io.ReadAll(rc)
				if err == nil && string(got) != string(blob[i*1024:(i+1)*1024]) {
					err = io.ErrUnexpectedEOF
				}
				if err != nil {
					errs <- err
				}
			}()
		}
		started.Wait()
		close(release)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
	burst()
	first := opened.Load()
	if first < parallel {
		t.Fatalf("first burst of %d reads opened %d connections: the test does not hold them at once", parallel, first)
	}
	burst()
	if n := opened.Load() - first; n != 0 {
		t.Errorf("second burst of %d reads opened %d new connections, want 0 (the first burst's, kept idle)", parallel, n)
	}
}
