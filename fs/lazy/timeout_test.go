package lazy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/remote"
)

// TestReadTimeoutBoundsRead: a read of a file that is not fetched yet fails
// within the read timeout when the registry is stopped or frozen, whatever
// remote's own retries and request timeouts (30s, 4 attempts) would allow,
// and however the kernel retries a failed read.
func TestReadTimeoutBoundsRead(t *testing.T) {
	const timeout = 2 * time.Second
	for _, tc := range []struct {
		name string
		addr func(*testing.T) string
	}{
		{"stopped", stoppedRegistry},
		{"frozen", frozenRegistry},
	} {
		t.Run(tc.name+"/fetcher", func(t *testing.T) {
			data, desc, _ := buildLayer(t)
			l := openLayer(t, data, remoteBlob(t, tc.addr(t), desc), desc, Options{ReadTimeout: timeout})
			t.Cleanup(func() { l.Close() })
			elapsed, err := waitFor(t, 4*timeout, func() error {
				_, err := readFile(context.Background(), l, "data/big", make([]byte, 4096), 0)
				return err
			})
			if err == nil {
				t.Fatal("read without a registry")
			}
			t.Logf("read failed after %v: %v", elapsed.Round(time.Millisecond), err)
			if elapsed > timeout+time.Second {
				t.Errorf("the read failed after %v; the read timeout is %v", elapsed.Round(time.Millisecond), timeout)
			}
		})
		t.Run(tc.name+"/fuse", func(t *testing.T) {
			if os.Getuid() != 0 {
				t.Skip("mounting FUSE needs root")
			}
			data, desc, _ := buildLayer(t)
			l := openLayer(t, data, remoteBlob(t, tc.addr(t), desc), desc, Options{ReadTimeout: timeout})
			mnt := mountLayer(t, l)
			fh, err := os.Open(filepath.Join(mnt, "data/big"))
			if err != nil {
				t.Fatal(err)
			}
			defer fh.Close()
			elapsed, err := waitFor(t, 4*timeout, func() error {
				_, err := fh.ReadAt(make([]byte, 4096), 0)
				return err
			})
			t.Logf("read failed after %v: %v", elapsed.Round(time.Millisecond), err)
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("read without a registry: %v, want EIO", err)
			}
			if elapsed > timeout+time.Second {
				t.Errorf("the read failed after %v; the read timeout is %v", elapsed.Round(time.Millisecond), timeout)
			}
		})
	}
}

// readFile reads the file at path of l at off into p, as a FUSE read does
// before the layer is local (without read-ahead).
func readFile(ctx context.Context, l *Layer, path string, p []byte, off int64) (int, error) {
	num := uint32(0)
	for _, name := range strings.Split(path, "/") {
		var ok bool
		if num, ok = l.ix.lookup(&l.ix.entries[num], name); !ok {
			return 0, fmt.Errorf("%s: %w", path, os.ErrNotExist)
		}
	}
	e := &l.ix.entries[num]
	return l.f.readAt(ctx, l.ix.fileChunks(e), e.size, p, off, 0)
}

// TestSlowRegistryIsNotCutShort: the read timeout is about a registry that
// sends nothing; a read whose bytes keep arriving succeeds, however long it
// takes.
func TestSlowRegistryIsNotCutShort(t *testing.T) {
	const timeout = time.Second
	data, desc, files := buildLayer(t)
	blob := &slowBlob{Blob: &testBlob{data: data}, pieces: 8, pause: timeout / 3}
	l := openLayer(t, data, blob, desc, Options{ReadTimeout: timeout, MinRequest: -1})
	t.Cleanup(func() { l.Close() })
	buf := make([]byte, len(files["data/small"]))
	start := time.Now()
	n, err := readFile(context.Background(), l, "data/small", buf, 0)
	if err != nil || !bytes.Equal(buf[:n], files["data/small"]) {
		t.Fatalf("read from a slow registry: %d bytes, %v", n, err)
	}
	if elapsed := time.Since(start); elapsed < timeout {
		t.Errorf("the read took %v: the registry was not slower than the timeout, the test proves nothing", elapsed)
	}
}

// slowBlob delivers each range in pieces, with a pause before each.
type slowBlob struct {
	Blob
	pieces int
	pause  time.Duration
}

func (b *slowBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	rc, err := b.Blob.ReadRange(ctx, off, n)
	if err != nil {
		return nil, err
	}
	return &slowReader{rc: rc, piece: max(n/int64(b.pieces), 1), pause: b.pause}, nil
}

type slowReader struct {
	rc    io.ReadCloser
	piece int64
	pause time.Duration
}

func (r *slowReader) Read(p []byte) (int, error) {
	time.Sleep(r.pause)
	return r.rc.Read(p[:min(int64(len(p)), r.piece)])
}

func (r *slowReader) Close() error { return r.rc.Close() }

// TestBlobNotFound: a registry that answers that it does not have the blob
// is not waited for as if it were down: the read fails at once, after one
// request.
func TestBlobNotFound(t *testing.T) {
	data, desc, _ := buildLayer(t)
	reg := newTestRegistry(t, data)
	reg.missing.Store(true)
	const timeout = 10 * time.Second
	l := openLayer(t, data, remoteBlob(t, reg.host, desc), desc, Options{ReadTimeout: timeout})
	t.Cleanup(func() { l.Close() })
	start := time.Now()
	_, err := readFile(context.Background(), l, "data/small", make([]byte, 100), 0)
	if !errors.Is(err, remote.ErrNotFound) {
		t.Errorf("read of a blob the registry does not have: %v, want remote.ErrNotFound", err)
	}
	// Waited for as if down, the read would fail after the read timeout;
	// the room below it is for a busy machine, not a speed target.
	if elapsed := time.Since(start); elapsed >= timeout/2 {
		t.Errorf("the read failed after %v; the read timeout is %v", elapsed, timeout)
	}
	if n := reg.requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

// chunksOf returns the chunks of the file at path of l.
func chunksOf(t *testing.T, l *Layer, path string) []chunk {
	t.Helper()
	num := uint32(0)
	for _, name := range strings.Split(path, "/") {
		var ok bool
		if num, ok = l.ix.lookup(&l.ix.entries[num], name); !ok {
			t.Fatalf("%s: no such file", path)
		}
	}
	return l.ix.fileChunks(&l.ix.entries[num])
}

// TestReadAfterNeighbourTimedOut: the chunks of a read that timed out fail
// at once for a moment (see retryWindow), but only for a read that needs
// them: a read of another file that merely brings them along (the next
// file in the blob) is served.
func TestReadAfterNeighbourTimedOut(t *testing.T) {
	data, desc, files := buildLayer(t)
	blob := &testBlob{data: data}
	l := openLayer(t, data, blob, desc, Options{})
	t.Cleanup(func() { l.Close() })
	big, small := chunksOf(t, l, "data/big"), chunksOf(t, l, "data/small")
	last := big[len(big)-1]
	if small[0].offset != last.end {
		t.Fatal("data/small does not follow data/big in the blob: the test proves nothing")
	}
	// data/big's last chunk is cached (as when another read fetched it);
	// a read of data/small timed out a moment ago.
	want := files["data/big"]
	if err := l.f.cache.Put(last.dgst(), want[last.fileOff:last.fileOff+last.size]); err != nil {
		t.Fatal(err)
	}
	failed := time.Now()
	l.f.failed(small, errors.New("the registry sent nothing (test)"))

	// data/small itself fails at once (unless a busy machine let the
	// window pass).
	buf := make([]byte, 100)
	_, err := readFile(context.Background(), l, "data/small", buf, 0)
	if !errors.Is(err, errRetrying) && time.Since(failed) < retryWindow {
		t.Errorf("read of data/small right after it timed out: %v, want %v", err, errRetrying)
	}
	off := int64(len(want) - len(buf))
	n, err := readFile(context.Background(), l, "data/big", buf, off)
	if err != nil || !bytes.Equal(buf[:n], want[off:]) {
		t.Fatalf("read of data/big's end after a read of data/small timed out: %d bytes, %v", n, err)
	}
}
