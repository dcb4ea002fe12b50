package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestStream(t *testing.T) {
	for _, size := range []int{1, 2, 1023, 1024, 1025, 3 * 1024, 10*1024 + 7} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			reg := newRegistry(t)
			want, desc := reg.addBlob(size)
			r := NewResolver(testOptions(t))
			b, err := r.Blob(t.Context(), reg.host+"/foo:latest", desc)
			if err != nil {
				t.Fatal(err)
			}
			got := readStream(t, b)
			if !bytes.Equal(got, want) {
				t.Fatalf("got %d bytes, want %d (equal prefix %d)", len(got), len(want), commonPrefix(got, want))
			}
			ranges := reg.blobRequests()
			if n := (size + 1023) / 1024; len(ranges) != n {
				t.Errorf("registry saw %d blob requests %q, want %d", len(ranges), ranges, n)
			}
			for _, rg := range ranges {
				if !strings.HasPrefix(rg, "bytes=") {
					t.Errorf("blob request with Range %q", rg)
				}
			}
			if reqs, n := r.Stats(); reqs != int64(len(ranges)) || n != int64(size) {
				t.Errorf("Stats() = %d requests, %d bytes; want %d, %d", reqs, n, len(ranges), size)
			}
		})
	}
}

func readStream(t *testing.T, b *Blob) []byte {
	t.Helper()
	s := b.Stream(t.Context())
	defer s.Close()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("read stream: %v", err)
	}
	return got
}

func commonPrefix(a, b []byte) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}

func TestStreamRetries(t *testing.T) {
	for _, tc := range []struct {
		name     string
		failures int // 500s per range before it is served
		status   int
		retries  int
		wantErr  string // "" for success
		kind     error  // what the error wraps; ErrUnavailable if nil
	}{
		{name: "recovers", failures: 2, status: 500, retries: 3},
		{name: "429 recovers", failures: 1, status: 429, retries: 2},
		{name: "gives up", failures: 3, status: 500, retries: 3, wantErr: "HTTP 500 (after 3 attempts)"},
		{name: "503 gives up", failures: 9, status: 503, retries: 2, wantErr: "HTTP 503 (after 2 attempts)"},
		{name: "404 at once", failures: 9, status: 404, retries: 3, wantErr: "HTTP 404: remote", kind: ErrNotFound},
		{name: "403 at once", failures: 9, status: 403, retries: 3, wantErr: "HTTP 403: remote"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newRegistry(t)
			want, desc := reg.addBlob(5*1024 + 3)
			reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
				if seen < tc.failures {
					w.WriteHeader(tc.status)
					return true
				}
				return false
			})
			opts := testOptions(t)
			opts.Retries = tc.retries
			b, err := NewResolver(opts).Blob(t.Context(), reg.host+"/foo:latest", desc)
			if err != nil {
				t.Fatal(err)
			}
			s := b.Stream(t.Context())
			defer s.Close()
			got, err := io.ReadAll(s)
			if tc.wantErr == "" {
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("got %d bytes, %v; want %d bytes", len(got), err, len(want))
				}
				return
			}
			kind := tc.kind
			if kind == nil {
				kind = ErrUnavailable
			}
			if !errors.Is(err, kind) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want %v with %q", err, kind, tc.wantErr)
			}
			for _, s := range []string{reg.host + "/foo", desc.Digest.String(), "range "} {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not name %q", err, s)
				}
			}
		})
	}
}

func TestStreamIgnoresRange(t *testing.T) {
	for _, size := range []int{1, 700, 4*1024 + 1} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			reg := newRegistry(t)
			want, desc := reg.addBlob(size)
			reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
				serveIgnoringRange(w, want)
				return true
			})
			b, err := NewResolver(testOptions(t)).Blob(t.Context(), reg.host+"/foo:latest", desc)
			if err != nil {
				t.Fatal(err)
			}
			if got := readStream(t, b); !bytes.Equal(got, want) {
				t.Fatalf("got %d bytes, want %d (equal prefix %d)", len(got), len(want), commonPrefix(got, want))
			}
		})
	}
}

// TestStreamIgnoresRangeLater covers a registry that honours Range for the
// first ranges only: the stream goes on from where the ranges stopped.
func TestStreamIgnoresRangeLater(t *testing.T) {
	reg := newRegistry(t)
	want, desc := reg.addBlob(8*1024 + 5)
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		if first, _ := requestedRange(t, r); first >= 2048 || r.Header.Get("Range") == "" {
			serveIgnoringRange(w, want)
			return true
		}
		return false
	})
	b, err := NewResolver(testOptions(t)).Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	if got := readStream(t, b); !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes, want %d (equal prefix %d)", len(got), len(want), commonPrefix(got, want))
	}
}

func TestStreamBadData(t *testing.T) {
	const size = 3*1024 + 10
	for _, tc := range []struct {
		name  string
		serve func(w http.ResponseWriter, first, last int64, blob []byte)
	}{
		{"200 short", func(w http.ResponseWriter, first, last int64, blob []byte) {
			chunked(w, http.StatusOK, blob[:len(blob)-1])
		}},
		{"200 long", func(w http.ResponseWriter, first, last int64, blob []byte) {
			chunked(w, http.StatusOK, append(blob, 'x'))
		}},
		{"200 wrong Content-Length", func(w http.ResponseWriter, first, last int64, blob []byte) {
			serveIgnoringRange(w, append(blob, 'x'))
		}},
		{"206 wrong Content-Range", func(w http.ResponseWriter, first, last int64, blob []byte) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first+1, last+1, len(blob)))
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(blob[first+1 : last+2])
		}},
		{"206 wrong total", func(w http.ResponseWriter, first, last int64, blob []byte) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(blob)+1))
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(blob[first : last+1])
		}},
		{"206 garbage Content-Range", func(w http.ResponseWriter, first, last int64, blob []byte) {
			w.Header().Set("Content-Range", "bytes */*")
			w.WriteHeader(http.StatusPartialContent)
		}},
		{"206 short", func(w http.ResponseWriter, first, last int64, blob []byte) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(blob)))
			chunked(w, http.StatusPartialContent, blob[first:last])
		}},
		{"206 long", func(w http.ResponseWriter, first, last int64, blob []byte) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(blob)))
			chunked(w, http.StatusPartialContent, append(blob[first:last+1:last+1], 'x'))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newRegistry(t)
			blob, desc := reg.addBlob(size)
			reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
				first, last := requestedRange(t, r)
				tc.serve(w, first, last, blob)
				return true
			})
			b, err := NewResolver(testOptions(t)).Blob(t.Context(), reg.host+"/foo:latest", desc)
			if err != nil {
				t.Fatal(err)
			}
			s := b.Stream(t.Context())
			defer s.Close()
			_, err = io.ReadAll(s)
			if !errors.Is(err, ErrBadData) {
				t.Fatalf("got %v, want ErrBadData", err)
			}
			t.Log(err)
		})
	}
}

// chunked sends body without a Content-Length.
func chunked(w http.ResponseWriter, status int, body []byte) {
	w.WriteHeader(status)
	w.(http.Flusher).Flush()
	_, _ = w.Write(body)
}

// TestStreamResumes breaks every range's first reply half-way: the stream
// asks for the rest and delivers the whole blob.
func TestStreamResumes(t *testing.T) {
	reg := newRegistry(t)
	want, desc := reg.addBlob(4*1024 + 200)
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		first, last := requestedRange(t, r)
		if seen > 0 || first%1024 != 0 {
			return false
		}
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(want)))
		w.Header().Set("Content-Length", fmt.Sprint(last-first+1))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(want[first : first+(last-first)/2])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	})
	b, err := NewResolver(testOptions(t)).Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	if got := readStream(t, b); !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes, want %d (equal prefix %d)", len(got), len(want), commonPrefix(got, want))
	}
	resumed := 0
	for _, rg := range reg.blobRequests() {
		var first, last int64
		if _, err := fmt.Sscanf(rg, "bytes=%d-%d", &first, &last); err == nil && first%1024 != 0 {
			resumed++
		}
	}
	if resumed != 5 {
		t.Errorf("registry saw %d resumed ranges in %q, want 5", resumed, reg.blobRequests())
	}
}

func TestStreamCanceled(t *testing.T) {
	reg := newRegistry(t)
	_, desc := reg.addBlob(4 * 1024)
	release := make(chan struct{})
	asked := make(chan struct{}, 1)
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		select {
		case asked <- struct{}{}:
		default:
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return true
	})
	defer close(release)
	b, err := NewResolver(testOptions(t)).Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	s := b.Stream(ctx)
	defer s.Close()
	go func() {
		<-asked // cancel while the registry holds a request
		cancel()
	}()
	if _, err := io.ReadAll(s); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}

// TestStreamCloseEarly closes streams before their end: no goroutine of
// theirs may be left.
func TestStreamCloseEarly(t *testing.T) {
	reg := newRegistry(t)
	_, desc := reg.addBlob(64 * 1024)
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		time.Sleep(time.Millisecond) // keep some fetches in flight
		return false
	})
	r := NewResolver(testOptions(t))
	b, err := r.Blob(t.Context(), reg.host+"/foo:latest", desc)
	if err != nil {
		t.Fatal(err)
	}
	// The registry's goroutines are the test's.
	ignore := goleak.IgnoreCurrent()

	unread := b.Stream(t.Context())
	if err := unread.Close(); err != nil {
		t.Fatal(err)
	}
	for _, n := range []int64{1, 1024, 5000, 20000} {
		s := b.Stream(t.Context())
		if _, err := io.CopyN(io.Discard, s, n); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Read(make([]byte, 1)); err == nil {
			t.Error("Read after Close succeeded")
		}
	}

	// The connections the streams used are closed or back in the
	// Resolver's pool. CloseIdleConnections closes those in the pool,
	// and those that reach it later (a request canceled while it dialed
	// still completes the dial) as they come.
	r.CloseIdleConnections()
	noGoroutinesBut(t, ignore)
}

// TestStreamsShareBuffers reads more streams at once than the Resolver has
// buffers for all their ranges in flight: each must still deliver its whole
// blob, and every buffer must be back once they are closed, also after
// early closes and failures.
func TestStreamsShareBuffers(t *testing.T) {
	reg := newRegistry(t)
	r := NewResolver(testOptions(t))
	const streams = 6 // × Concurrency 3 ranges wanted, 3 buffers shared
	type blob struct {
		want []byte
		b    *Blob
	}
	var blobs []blob
	for i := range streams {
		want, desc := reg.addBlob(20*1024 + i*777)
		b, err := r.Blob(t.Context(), reg.host+"/foo:latest", desc)
		if err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, blob{want, b})
	}
	errs := make(chan error, streams)
	for _, bl := range blobs {
		go func() {
			s := bl.b.Stream(t.Context())
			got, err := io.ReadAll(s)
			s.Close() // before the check below counts the buffers
			if err == nil && !bytes.Equal(got, bl.want) {
				err = fmt.Errorf("got %d bytes, want %d (equal prefix %d)", len(got), len(bl.want), commonPrefix(got, bl.want))
			}
			errs <- err
		}()
	}
	for range streams {
		select {
		case err := <-errs:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("streams sharing the buffers did not finish: stuck waiting for a buffer")
		}
	}
	if n := len(r.bufs); n != cap(r.bufs) {
		t.Fatalf("%d of %d buffers back after the streams closed", n, cap(r.bufs))
	}

	// Streams closed early, with ranges in flight or queued.
	for _, n := range []int64{0, 1, 5000} {
		s := blobs[0].b.Stream(t.Context())
		if _, err := io.CopyN(io.Discard, s, n); err != nil {
			t.Fatal(err)
		}
		s.Close()
		s.Close()
	}
	if n := len(r.bufs); n != cap(r.bufs) {
		t.Fatalf("%d of %d buffers back after early closes", n, cap(r.bufs))
	}

	// A stream that fails.
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		http.Error(w, "gone", http.StatusNotFound)
		return true
	})
	s := blobs[1].b.Stream(t.Context())
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("read of a blob the registry lost succeeded")
	}
	s.Close()
	if n := len(r.bufs); n != cap(r.bufs) {
		t.Fatalf("%d of %d buffers back after a failed stream", n, cap(r.bufs))
	}
	// With no stream open, no buffer is kept.
	for range cap(r.bufs) {
		if b := <-r.bufs; b != nil {
			t.Fatalf("a %d-byte buffer kept with no stream open", cap(b))
		}
	}
}
