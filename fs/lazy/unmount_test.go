package lazy

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// lateBlob is a registry that answers a canceled request late: each
// ReadRange waits until its ctx is done, and then until late is closed.
type lateBlob struct {
	Blob
	late     chan struct{}
	started  chan struct{} // closed when the first request arrives
	canceled chan struct{} // closed when the first request sees its ctx done
	once     [2]sync.Once
	running  atomic.Int64 // ReadRange calls under way
}

func (b *lateBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	b.running.Add(1)
	defer b.running.Add(-1)
	b.once[0].Do(func() { close(b.started) })
	<-ctx.Done()
	b.once[1].Do(func() { close(b.canceled) })
	<-b.late
	return nil, ctx.Err()
}

// TestUnmountWaitsForPrefetch: the prefetch that Mount starts belongs to
// the layer. Unmount stops it, and its done is closed only once the
// prefetch has returned, even when the registry answers the canceled
// request late; then Close leaves no goroutine of the layer running.
func TestUnmountWaitsForPrefetch(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	// Goroutines of earlier tests are not this test's: TestMain checks
	// that they are gone by the end.
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	data, desc, _ := buildLayer(t)
	blob := &lateBlob{Blob: &testBlob{data: data}, late: make(chan struct{}),
		started: make(chan struct{}), canceled: make(chan struct{})}
	defer func() {
		select {
		case <-blob.late:
		default:
			close(blob.late) // the test failed half-way: let the prefetch go
		}
	}()
	l := openLayer(t, data, blob, desc, Options{})
	mnt := filepath.Join(t.TempDir(), "lazy")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := l.Mount(context.Background(), mnt); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // if the test failed before its Unmount
		if done, err := l.Unmount(); err == nil {
			<-done
		}
	})
	<-blob.started // the prefetch of etc/hostname is in the registry
	l.mu.Lock()
	server := l.server
	l.mu.Unlock()

	done, err := l.Unmount()
	if err != nil {
		t.Fatal(err)
	}
	<-blob.canceled
	server.Wait() // nothing uses the mount: the server stops
	// The server has stopped and the prefetch is still in the registry.
	// The wait only gives a wrong done the chance to show; a right one
	// passes whatever the machine's speed.
	select {
	case <-done:
		t.Fatal("Unmount's done was closed while the prefetch Mount started was still running")
	case <-time.After(100 * time.Millisecond):
	}
	close(blob.late)
	<-done
	if n := blob.running.Load(); n != 0 {
		t.Errorf("%d requests of the layer under way after Unmount's done was closed", n)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCloseStopsPrefetch: Close stops the prefetch of a layer that is
// still mounted and waits for it, so that nothing writes to the closed
// blob copy.
func TestCloseStopsPrefetch(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	data, desc, _ := buildLayer(t)
	blob := &lateBlob{Blob: &testBlob{data: data}, late: make(chan struct{}),
		started: make(chan struct{}), canceled: make(chan struct{})}
	close(blob.late) // answer as soon as canceled
	l := openLayer(t, data, blob, desc, Options{})
	mountLayer(t, l)
	<-blob.started
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if n := blob.running.Load(); n != 0 {
		t.Errorf("%d requests of the layer under way after Close returned", n)
	}
}
