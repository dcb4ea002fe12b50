package remote

import (
	"io"
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
