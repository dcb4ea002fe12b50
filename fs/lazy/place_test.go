package lazy

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestPlaceNowGroupsRequests: PlaceNow fetches the files it places as a
// replay does, files near each other in the blob in one request, rather
// than a round trip a file; what it places is the files' bytes.
func TestPlaceNowGroupsRequests(t *testing.T) {
	// Reads fetch exactly what they ask for: one request a file without
	// the grouping.
	l, blob, files := dirsLayer(t, Options{MinRequest: -1})
	place, tmp := t.TempDir(), t.TempDir()
	l.SetPlaced(place)
	names := []string{"d/f000", "d/f001", "d/f002", "e/f000", "missing", "d"}
	if err := l.PlaceNow(t.Context(), tmp, names...); err != nil {
		t.Fatal(err)
	}
	// d/f000-f002 lie together; e/f000 27 files (about 270 KiB) further.
	if got := blob.requests.Load(); got != 2 {
		t.Errorf("placing 4 files made %d requests, want 2 (one for d's three, one for e/f000)", got)
	}
	for _, name := range names[:4] {
		got, err := os.ReadFile(filepath.Join(place, name))
		if err != nil || !bytes.Equal(got, files[name]) {
			t.Errorf("%s placed: %d bytes (%v), want its %d", name, len(got), err, len(files[name]))
		}
	}
	if _, err := os.Lstat(filepath.Join(place, "missing")); err == nil {
		t.Error("missing placed: the layer has no such file")
	}
	if entries, _ := os.ReadDir(tmp); len(entries) != 0 {
		t.Errorf("%d temporary files left in tmp", len(entries))
	}
}
