package extract

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestReadAheadStream: the stream read through a read-ahead is its
// source's, whatever the sizes of the source's and the reader's reads,
// then's error ends it after every byte, and finally runs once the
// goroutine is done.
func TestReadAheadStream(t *testing.T) {
	data := make([]byte, 5*aheadBuffer+123)
	for i := range data {
		data[i] = byte(rand.IntN(256))
	}
	thenErr := errors.New("after the end")
	for _, tc := range []struct {
		name string
		src  io.Reader
		then error
		want error
	}{
		{"whole reads", bytes.NewReader(data), nil, io.EOF},
		{"one byte at a time", iotest.OneByteReader(bytes.NewReader(data)), nil, io.EOF},
		{"data and EOF together", iotest.DataErrReader(bytes.NewReader(data)), nil, io.EOF},
		{"then fails", bytes.NewReader(data), thenErr, thenErr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			thenCalled, finished := false, make(chan bool)
			a := startReadAhead(tc.src, func() error { thenCalled = true; return tc.then }, func() { close(finished) })
			defer a.stop()
			var got []byte
			buf := make([]byte, 1000)
			var err error
			for err == nil {
				var n int
				n, err = a.Read(buf[:rand.IntN(len(buf))+1])
				got = append(got, buf[:n]...)
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("stream ended with %v, want %v", err, tc.want)
			}
			if !bytes.Equal(got, data) {
				t.Errorf("read %d bytes, not the source's %d", len(got), len(data))
			}
			if !thenCalled {
				t.Error("then was not called at the end")
			}
			select {
			case <-finished:
			case <-time.After(10 * time.Second):
				t.Error("finally was not called after the end")
			}
			if n, err := a.Read(buf); n != 0 || !errors.Is(err, tc.want) {
				t.Errorf("a read after the end: %d, %v", n, err)
			}
		})
	}
}

// TestReadAheadSourceError: a source's error reaches the reader after the
// bytes read before it, and then is not called.
func TestReadAheadSourceError(t *testing.T) {
	boom := errors.New("registry went away")
	src := io.MultiReader(bytes.NewReader(bytes.Repeat([]byte("x"), aheadBuffer+10)), iotest.ErrReader(boom))
	a := startReadAhead(src, func() error { t.Error("then called after an error"); return nil }, func() {})
	defer a.stop()
	got, err := io.ReadAll(a)
	if !errors.Is(err, boom) || len(got) != aheadBuffer+10 {
		t.Errorf("read %d bytes, then %v; want %d, then %v", len(got), err, aheadBuffer+10, boom)
	}
}

// blockingReader blocks in Read until release is closed, then fails.
type blockingReader struct{ entered, release chan struct{} }

func (b blockingReader) Read([]byte) (int, error) {
	close(b.entered)
	<-b.release
	return 0, errors.New("released")
}

// TestReadAheadStopWhileReading: stop returns at once while the goroutine
// is in its source's Read; the goroutine ends (finally called) once that
// Read returns, as when the caller cancels what the source reads from.
func TestReadAheadStopWhileReading(t *testing.T) {
	src := blockingReader{entered: make(chan struct{}), release: make(chan struct{})}
	finished := make(chan bool)
	a := startReadAhead(src, func() error { return nil }, func() { close(finished) })
	<-src.entered
	stopped := make(chan bool)
	go func() { a.stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("stop waited for the source's Read")
	}
	select {
	case <-finished:
		t.Fatal("finally ran while the source's Read was under way")
	default:
	}
	close(src.release)
	select {
	case <-finished:
	case <-time.After(10 * time.Second):
		t.Fatal("the goroutine did not end after its source's Read returned")
	}
}

// stallingSource serves data, then blocks in Read until ctx is done; it
// records whether a Read is under way.
type stallingSource struct {
	data    *bytes.Reader
	ctx     context.Context
	reading atomic.Bool
}

func (s *stallingSource) Read(p []byte) (int, error) {
	s.reading.Store(true)
	defer s.reading.Store(false)
	if s.data.Len() > 0 {
		return s.data.Read(p)
	}
	<-s.ctx.Done()
	time.Sleep(100 * time.Millisecond) // a Read takes a while to see it
	return 0, context.Cause(s.ctx)
}

// TestLayerAbortsItsSource: an extraction that fails while its read-ahead
// waits in the source's Read calls Abort, and returns only once that Read
// has returned, so the caller may close the source; the error is the
// extraction's, not the abort's.
func TestLayerAbortsItsSource(t *testing.T) {
	// A bad entry in the blob's first gzip member, then more of the
	// stream than has arrived: the source stalls in the second member.
	tarball := tarOf(t, entry{name: "../escape", typ: tar.TypeReg, body: "x"},
		entry{name: "big", typ: tar.TypeReg, body: strings.Repeat("0123456789abcdef", 1<<16)})
	first, second := gzipOf(t, tarball[:4096]), gzipOf(t, tarball[4096:])
	blob := append(append([]byte{}, first...), second...)
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	src := &stallingSource{data: bytes.NewReader(blob[:len(first)+10]), ctx: ctx}
	aborted := false
	done := make(chan error, 1)
	go func() {
		_, err := Layer(context.Background(), src, t.TempDir(), Options{
			Digest: digest.FromBytes(blob),
			Abort:  func(err error) { aborted = true; cancel(err) },
		})
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "escape") {
			t.Errorf("extraction failed with %v, want the bad entry", err)
		}
		if !aborted {
			t.Error("Abort was not called")
		}
		if src.reading.Load() {
			t.Error("Layer returned while its source was being read")
		}
	case <-time.After(30 * time.Second):
		cancel(errors.New("test over"))
		t.Fatal("Layer did not return: its source stalls until aborted")
	}
}
