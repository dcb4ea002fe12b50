package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// uploadBlob pushes data as a blob of repo through addr with a monolithic
// upload and returns its digest.
func uploadBlob(t *testing.T, addr, repo string, data []byte) digest.Digest {
	t.Helper()
	dgst := digest.FromBytes(data)
	resp, err := http.Post("http://"+addr+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload: %s", resp.Status)
	}
	loc, err := url.Parse("http://" + addr)
	if err != nil {
		t.Fatal(err)
	}
	loc, err = loc.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	q := loc.Query()
	q.Set("digest", dgst.String())
	loc.RawQuery = q.Encode()
	req, err := http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload blob: %s", resp.Status)
	}
	return dgst
}

// get fetches path from addr with an optional Range header and returns the
// status and body; a body cut short is returned with the read error.
func get(t *testing.T, addr, path, rng string) (int, []byte, error) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func blobData() []byte {
	var b bytes.Buffer
	for i := range 10000 {
		fmt.Fprintf(&b, "line %05d\n", i)
	}
	return b.Bytes()
}

func TestRegistry(t *testing.T) {
	r := StartT(t)
	data := blobData()
	dgst := uploadBlob(t, r.Addr(), "test/blob", data)
	blobURL := "/v2/test/blob/blobs/" + dgst.String()

	onDisk, err := os.ReadFile(r.BlobPath(dgst))
	if err != nil {
		t.Fatalf("BlobPath: %v", err)
	}
	if !bytes.Equal(onDisk, data) {
		t.Fatalf("BlobPath holds %d bytes, want the %d uploaded", len(onDisk), len(data))
	}

	status, got, err := get(t, r.Addr(), blobURL, "bytes=100-199")
	if err != nil || status != http.StatusPartialContent || !bytes.Equal(got, data[100:200]) {
		t.Fatalf("ranged GET: status %d, %q, %v", status, got, err)
	}

	// The registry serves whatever the file holds.
	if err := os.WriteFile(r.BlobPath(dgst), bytes.ToUpper(data), 0o644); err != nil {
		t.Fatal(err)
	}
	status, got, err = get(t, r.Addr(), blobURL, "")
	if err != nil || status != http.StatusOK || !bytes.Equal(got, bytes.ToUpper(data)) {
		t.Fatalf("GET corrupted blob: status %d, %d bytes, %v", status, len(got), err)
	}

	blobGets := func(entries []AccessEntry) []int {
		var statuses []int
		for _, e := range entries {
			if e.Method == http.MethodGet && e.URI == blobURL {
				statuses = append(statuses, e.Status)
			}
		}
		return statuses
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	entries, err := r.WaitAccessLog(ctx, func(es []AccessEntry) bool { return len(blobGets(es)) >= 2 })
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(blobGets(entries)); got != "[206 200]" {
		t.Errorf("access log GET statuses for the blob = %v, want [206 200]; log entries: %+v", got, entries)
	}

	pid := r.PID()
	if err := r.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("registry pid %d after Stop: kill 0 = %v, want ESRCH", pid, err)
	}
	if err := r.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func TestParseAccessLine(t *testing.T) {
	line := `127.0.0.1 - - [26/Nov/2026:16:27:01 +0000] "GET /v2/foo/blobs/sha256:ab?x=1 HTTP/1.1" 206 100 "" "containerd/2.4 \"x\""`
	e, ok := parseAccessLine(line)
	if !ok {
		t.Fatal("line not parsed")
	}
	if e.Method != "GET" || e.URI != "/v2/foo/blobs/sha256:ab?x=1" || e.Status != 206 || e.Size != 100 ||
		e.Time.Year() != 2026 || !strings.HasPrefix(e.UserAgent, "containerd/2.4") {
		t.Errorf("parsed %+v", e)
	}
	if _, ok := parseAccessLine(`time="2026-11-26T16:27:00Z" level=info msg="listening"`); ok {
		t.Error("application log line parsed as access log")
	}
}
