package registry

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"syscall"
	"testing"
	"time"
)

func startProxy(t *testing.T, target string) *Proxy {
	t.Helper()
	p, err := NewProxy(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("close proxy: %v", err)
		}
	})
	return p
}

func TestProxy(t *testing.T) {
	r := StartT(t)
	p := startProxy(t, r.Addr())
	data := blobData()
	// Uploading through the proxy works: Location headers name the proxy.
	dgst := uploadBlob(t, p.Addr(), "test/proxy", data)
	blobURL := "/v2/test/proxy/blobs/" + dgst.String()
	for _, req := range p.Requests() {
		if req.Method == http.MethodPut && req.Status != http.StatusCreated {
			t.Errorf("upload through proxy: %+v", req)
		}
	}
	p.Reset()

	t.Run("ranges", func(t *testing.T) {
		defer p.Reset()
		for _, rng := range []string{"bytes=0-9", "bytes=1000-1999"} {
			if status, _, err := get(t, p.Addr(), blobURL, rng); err != nil || status != http.StatusPartialContent {
				t.Fatalf("GET %s: %d %v", rng, status, err)
			}
		}
		if status, _, err := get(t, p.Addr(), blobURL, ""); err != nil || status != http.StatusOK {
			t.Fatalf("GET: %d %v", status, err)
		}
		s := p.Stats()[blobURL]
		if s.Requests != 3 || s.Bytes != int64(10+1000+len(data)) {
			t.Errorf("stats = %+v, want 3 requests, %d bytes", s, 10+1000+len(data))
		}
		if len(s.Ranges) != 2 || s.Ranges[0] != "bytes=0-9" || s.Ranges[1] != "bytes=1000-1999" {
			t.Errorf("ranges = %q", s.Ranges)
		}
	})

	t.Run("fail next", func(t *testing.T) {
		defer p.Reset()
		p.FailNext(2, http.StatusInternalServerError)
		var statuses []int
		for range 3 {
			status, _, err := get(t, p.Addr(), blobURL, "")
			if err != nil {
				t.Fatal(err)
			}
			statuses = append(statuses, status)
		}
		if statuses[0] != 500 || statuses[1] != 500 || statuses[2] != 200 {
			t.Errorf("statuses = %v, want [500 500 200]", statuses)
		}
		reqs := p.Requests()
		if len(reqs) != 3 || !reqs[0].Fault || !reqs[1].Fault || reqs[2].Fault {
			t.Errorf("recorded %+v", reqs)
		}
	})

	t.Run("hold", func(t *testing.T) {
		defer p.Reset()
		defer p.Release()
		p.HoldAfter("/blobs/", 1)
		if status, _, err := get(t, p.Addr(), blobURL, "bytes=0-9"); err != nil || status != http.StatusPartialContent {
			t.Fatalf("the request let through: %d %v", status, err)
		}
		done := make(chan int, 2)
		for range 2 {
			go func() {
				status, _, _ := get(t, p.Addr(), blobURL, "bytes=0-9")
				done <- status
			}()
		}
		deadline := time.Now().Add(10 * time.Second)
		for p.Holding() != 2 {
			if time.Now().After(deadline) {
				t.Fatalf("%d requests held, want 2", p.Holding())
			}
			time.Sleep(10 * time.Millisecond)
		}
		p.HoldAfter("/blobs/", 1)
		if status := <-done; status != http.StatusPartialContent {
			t.Errorf("a held request let through: %d", status)
		}
		if n := p.Holding(); n != 1 {
			t.Fatalf("%d requests held after one of two was let through, want 1", n)
		}
		p.Release()
		if status := <-done; status != http.StatusPartialContent {
			t.Errorf("a held request released: %d", status)
		}
		held := 0
		for _, r := range p.Requests() {
			if r.Held {
				held++
			}
		}
		if held != 2 || p.Holding() != 0 {
			t.Errorf("%d requests recorded held, %d holding; want 2, 0", held, p.Holding())
		}
	})

	t.Run("fault filter", func(t *testing.T) {
		defer p.Reset()
		p.Inject(Fault{Method: http.MethodGet, Path: "/blobs/", Status: http.StatusServiceUnavailable}, 1)
		if status, _, _ := get(t, p.Addr(), "/v2/", ""); status != http.StatusOK {
			t.Errorf("GET /v2/ = %d, want 200 (not matched)", status)
		}
		if status, _, _ := get(t, p.Addr(), blobURL, ""); status != http.StatusServiceUnavailable {
			t.Errorf("GET blob = %d, want 503", status)
		}
		p.Inject(Fault{Status: 500}, 5)
		p.ClearFaults()
		if status, _, _ := get(t, p.Addr(), blobURL, ""); status != http.StatusOK {
			t.Errorf("GET blob after ClearFaults = %d", status)
		}
	})

	t.Run("cut", func(t *testing.T) {
		defer p.Reset()
		p.Inject(Fault{CutAfter: 1000}, 1)
		_, got, err := get(t, p.Addr(), blobURL, "")
		if !errors.Is(err, io.ErrUnexpectedEOF) || !bytes.Equal(got, data[:1000]) {
			t.Errorf("cut GET: %d bytes, err %v; want 1000 bytes and unexpected EOF", len(got), err)
		}
		if reqs := p.Requests(); len(reqs) != 1 || reqs[0].Bytes != 1000 || !reqs[0].Fault {
			t.Errorf("recorded %+v", reqs)
		}
	})

	t.Run("delay", func(t *testing.T) {
		defer p.Reset()
		p.Inject(Fault{Delay: 200 * time.Millisecond}, 1)
		start := time.Now()
		if status, _, err := get(t, p.Addr(), blobURL, "bytes=0-0"); err != nil || status != http.StatusPartialContent {
			t.Fatalf("delayed GET: %d %v", status, err)
		}
		if d := time.Since(start); d < 200*time.Millisecond {
			t.Errorf("delayed GET took %v", d)
		}
	})

	t.Run("refuse", func(t *testing.T) {
		defer p.Reset()
		if err := p.Refuse(); err != nil {
			t.Fatal(err)
		}
		if _, _, err := get(t, p.Addr(), "/v2/", ""); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("GET while refusing: %v, want ECONNREFUSED", err)
		}
		if err := p.Accept(); err != nil {
			t.Fatal(err)
		}
		if status, _, err := get(t, p.Addr(), "/v2/", ""); err != nil || status != http.StatusOK {
			t.Errorf("GET after Accept: %d %v", status, err)
		}
	})
}
