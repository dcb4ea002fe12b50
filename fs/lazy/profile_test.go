package lazy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestParseProfile: a profile that does not parse, is of another version,
// names a bad digest or passes a bound is refused with an error; a good one
// reads back as written.
func TestParseProfile(t *testing.T) {
	layer := digest.FromString("layer")
	toc := digest.FromString("toc")
	good := fmt.Sprintf(`{"version":1,"layer":%q,"toc":%q,"files":["usr/bin/python3"]}`, layer, toc)
	manyFiles := fmt.Sprintf(`{"version":1,"layer":%q,"toc":%q,"files":[%s"x"]}`, layer, toc, strings.Repeat(`"x",`, maxAccessed))
	longPath := fmt.Sprintf(`{"version":1,"layer":%q,"toc":%q,"files":[%q]}`, layer, toc, strings.Repeat("a", maxProfilePath+1))
	for _, tc := range []struct {
		name, in, err string
	}{
		{"good", good, ""},
		{"empty", "", "does not parse"},
		{"not JSON", "usr/bin/python3\n", "does not parse"},
		{"other version", strings.Replace(good, `"version":1`, `"version":2`, 1), "version 2"},
		{"no version", strings.Replace(good, `"version":1,`, ``, 1), "version 0"},
		{"bad layer", strings.Replace(good, layer.String(), "sha256:1234", 1), "profile layer"},
		{"bad toc", strings.Replace(good, toc.String(), "md5:xyz", 1), "profile toc"},
		{"unknown field", strings.Replace(good, `"version":1`, `"version":1,"extra":true`, 1), "unknown field"},
		{"trailing data", good + "{}", "after the JSON"},
		{"too many files", manyFiles, "more than"},
		{"long path", longPath, "more than"},
		{"too large", good + strings.Repeat(" ", maxProfileSize), "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := parseProfile([]byte(tc.in))
			if tc.err == "" {
				if err != nil || p.Layer != layer || p.TOC != toc || len(p.Files) != 1 || p.Files[0] != "usr/bin/python3" {
					t.Fatalf("parse: %+v, %v", p, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("parse: %v, want an error saying %q", err, tc.err)
			}
		})
	}
}

// TestReadProfile: a profile written by WriteProfile reads back under the
// layer's name; a missing one is errNoProfile; one under the name of
// another layer, or that is not a regular file, is refused.
func TestReadProfile(t *testing.T) {
	dir := t.TempDir()
	layer, other := digest.FromString("layer"), digest.FromString("other")
	p := Profile{Layer: layer, TOC: digest.FromString("toc"), Files: []string{"a", "b/c"}}
	if err := WriteProfile(dir, p); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "sha256-"+layer.Encoded()+".json")); err != nil {
		t.Fatalf("profile file: %v", err)
	}
	got, err := ReadProfile(dir, layer)
	if err != nil || got.Version != ProfileVersion || got.TOC != p.TOC || fmt.Sprint(got.Files) != "[a b/c]" {
		t.Fatalf("read back: %+v, %v", got, err)
	}
	if _, err := ReadProfile(dir, other); !errors.Is(err, errNoProfile) {
		t.Errorf("missing profile: %v, want errNoProfile", err)
	}
	// A copy under the other layer's name is the profile of layer.
	b, _ := os.ReadFile(filepath.Join(dir, ProfileName(layer)))
	os.WriteFile(filepath.Join(dir, ProfileName(other)), b, 0o644)
	if _, err := ReadProfile(dir, other); err == nil || !strings.Contains(err.Error(), "not "+other.String()) {
		t.Errorf("profile of another layer: %v", err)
	}
	third := digest.FromString("third")
	os.Mkdir(filepath.Join(dir, ProfileName(third)), 0o755)
	if _, err := ReadProfile(dir, third); err == nil || errors.Is(err, errNoProfile) {
		t.Errorf("directory as a profile: %v", err)
	}
}

// TestResolveProfile: only clean relative paths of regular files with
// content in the index count, each once, in the order given; nothing else
// is looked up, so a profile cannot name anything outside the layer.
func TestResolveProfile(t *testing.T) {
	l, _ := smallFilesLayer(t, 4, 1000, func(d []byte) Blob { return &testBlob{data: d} }, Options{})
	num := func(name string) uint32 {
		n, ok := l.ix.lookup(&l.ix.entries[0], name)
		if !ok {
			t.Fatalf("no %s", name)
		}
		return n
	}
	files, skipped := l.ix.resolve([]string{
		"f002", "f000", "f002", "/f001", "./f001", "f001/", "../f001", "f003/../f001", "", "missing", ".", "f003",
	})
	if want := []uint32{num("f002"), num("f000"), num("f003")}; fmt.Sprint(files) != fmt.Sprint(want) {
		t.Errorf("resolved %v, want %v (f002 f000 f003)", files, want)
	}
	if skipped != 8 {
		t.Errorf("skipped %d paths, want 8", skipped)
	}
}

// profiledLayer opens a layer of 40 files of 10 KiB with a profile naming
// files, and returns it with its blob.
func profiledLayer(t *testing.T, files []string, edit func(*Profile)) (*Layer, *testBlob, [][]byte) {
	t.Helper()
	dir := t.TempDir()
	var blob *testBlob
	first, bodies := smallFilesLayer(t, 40, 10<<10, func(d []byte) Blob { blob = &testBlob{data: d}; return blob }, Options{})
	p := Profile{Layer: first.desc.Digest, TOC: first.tocDigest, Files: files}
	if edit != nil {
		edit(&p)
	}
	if err := WriteProfile(dir, p); err != nil {
		t.Fatal(err)
	}
	l, _ := smallFilesLayer(t, 40, 10<<10, func(d []byte) Blob { blob = &testBlob{data: d}; return blob }, Options{ProfileDir: dir})
	return l, blob, bodies
}

// TestReplayMakesReadsHits: mounting a layer with a profile fetches the
// profiled files at once, in a request per stretch of the blob they lie
// in (files apart by more than replayGap take two); reads of them through
// the mount then make no request, and a file not in the profile still
// loads on demand.
func TestReplayMakesReadsHits(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	l, blob, bodies := profiledLayer(t, []string{"f039", "f002", "f003", "f000", "../f010", "nope"}, nil)
	if len(l.profile) != 4 {
		t.Fatalf("profile resolved to %d files, want 4", len(l.profile))
	}
	mnt := mountLayer(t, l)
	l.mu.Lock()
	prefetched := l.prefetched
	l.mu.Unlock()
	<-prefetched
	if got := blob.requests.Load(); got != 2 {
		t.Errorf("replay made %d requests, want 2 (f000-f003, f039)", got)
	}
	before := blob.requests.Load()
	for _, i := range []int{39, 2, 3, 0} {
		got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("f%03d", i)))
		if err != nil || !bytes.Equal(got, bodies[i]) {
			t.Fatalf("f%03d: %d bytes (%v), want its %d", i, len(got), err, len(bodies[i]))
		}
	}
	if got := blob.requests.Load() - before; got != 0 {
		t.Errorf("reads of the profiled files made %d requests, want 0", got)
	}
	got, err := os.ReadFile(filepath.Join(mnt, "f020"))
	if err != nil || !bytes.Equal(got, bodies[20]) {
		t.Fatalf("f020: %d bytes (%v)", len(got), err)
	}
	if blob.requests.Load() == before {
		t.Errorf("a file not in the profile was served without a request: was it replayed?")
	}
}

// TestReplayedBytesAreVerified: a replay of a registry that corrupts what
// it serves caches nothing and fails no mount; the reads then fail as
// they would without a profile.
func TestReplayedBytesAreVerified(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	l, blob, _ := profiledLayer(t, []string{"f001"}, nil)
	blob.corrupt.Store(true)
	mountLayer(t, l)
	l.mu.Lock()
	prefetched := l.prefetched
	l.mu.Unlock()
	<-prefetched
	if blob.requests.Load() == 0 {
		t.Fatal("the replay made no request")
	}
	for _, c := range chunksOf(t, l, "f001") {
		if l.f.cache.Has(c.dgst()) {
			t.Fatalf("chunk %s of f001 cached from a corrupt reply", c.dgst())
		}
	}
}

// TestBadProfileIgnored: a profile recorded for another TOC, or that does
// not parse, is ignored: the layer opens and replays nothing.
func TestBadProfileIgnored(t *testing.T) {
	l, blob, _ := profiledLayer(t, []string{"f001"}, func(p *Profile) { p.TOC = digest.FromString("another TOC") })
	if len(l.profile) != 0 {
		t.Errorf("a profile of another TOC resolved to %d files", len(l.profile))
	}
	l.replay(context.Background())
	if n := blob.requests.Load(); n != 0 {
		t.Errorf("an ignored profile made %d requests", n)
	}

	dir := t.TempDir()
	first, _ := smallFilesLayer(t, 40, 10<<10, func(d []byte) Blob { return &testBlob{data: d} }, Options{})
	os.WriteFile(filepath.Join(dir, ProfileName(first.desc.Digest)), []byte(`{"version":1,"layer":`), 0o644)
	var blob2 *testBlob
	l2, _ := smallFilesLayer(t, 40, 10<<10, func(d []byte) Blob { blob2 = &testBlob{data: d}; return blob2 }, Options{ProfileDir: dir})
	if len(l2.profile) != 0 {
		t.Errorf("a truncated profile resolved to %d files", len(l2.profile))
	}
	l2.replay(context.Background())
	if n := blob2.requests.Load(); n != 0 {
		t.Errorf("a truncated profile made %d requests", n)
	}
}

// TestReplayAhead: a profile replayed from the TOC read ahead fills the
// shared chunk cache, so the replay at the layer's mount fetches nothing.
func TestReplayAhead(t *testing.T) {
	dir := t.TempDir()
	var data []byte
	blob := &testBlob{}
	first, _ := smallFilesLayer(t, 40, 10<<10, func(d []byte) Blob { data, blob.data = d, d; return blob }, Options{})
	if err := WriteProfile(dir, Profile{Layer: first.desc.Digest, TOC: first.tocDigest, Files: []string{"f030", "f001"}}); err != nil {
		t.Fatal(err)
	}
	rec, err := ReadTOC(bytes.NewReader(data), first.desc, first.tocDigest)
	if err != nil {
		t.Fatal(err)
	}
	o := Options{Cache: first.f.cache, ProfileDir: dir}
	blob.requests.Store(0)
	kept := ReplayAhead(context.Background(), rec, blob, first.desc, first.tocDigest, o)
	ahead := blob.requests.Load()
	if ahead != 2 {
		t.Errorf("the replay ahead made %d requests, want 2 (f001, f030)", ahead)
	}
	l := openLayer(t, data, blob, first.desc, o)
	t.Cleanup(func() { l.Close() })
	if len(l.profile) != 2 {
		t.Fatalf("profile resolved to %d files at the mount", len(l.profile))
	}
	l.replay(context.Background())
	if n := blob.requests.Load() - ahead; n != 0 {
		t.Errorf("the replay at the mount made %d requests after the replay ahead, want 0", n)
	}
	// What the replay ahead fetched goes into the layer's blob copy, for
	// population.
	if kept == nil {
		t.Fatal("ReplayAhead returned no bytes")
	}
	l.Keep(context.Background(), kept)
	for _, name := range []string{"f001", "f030"} {
		for _, c := range chunksOf(t, l, name) {
			if !l.f.partial.has(span{c.offset, c.end}) {
				t.Errorf("the blob copy lacks the bytes of %s the replay ahead fetched", name)
			}
		}
	}
}
