package lazy

import (
	"archive/tar"
	"os"
	"path"
	"runtime"
	"testing"
)

// startLayer is a layer holding the start files of this machine's
// architecture (see startFiles) that sit in one directory, a program and a
// symbolic link to the C library.
func startLayer(t *testing.T, o Options) (l *Layer, start []string, other string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	names := startFiles[runtime.GOARCH]
	if len(names) < 3 {
		t.Skipf("no start files listed for %s", runtime.GOARCH)
	}
	// etc/ld.so.cache, the first interpreter and C library listed, and
	// Debian's /bin/sh.
	start = []string{names[0], names[1], names[3], "usr/bin/dash"}
	other = "usr/bin/program"
	var entries []tarEntry
	dirs := map[string]bool{}
	var mkdir func(d string)
	mkdir = func(d string) { // parents first
		if d == "." || dirs[d] {
			return
		}
		mkdir(path.Dir(d))
		dirs[d] = true
		entries = append(entries, tarEntry{hdr: tar.Header{Name: d + "/", Typeflag: tar.TypeDir, Mode: 0o755}})
	}
	add := func(name string, size int) {
		mkdir(path.Dir(name))
		entries = append(entries, tarEntry{
			hdr:  tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o755},
			body: randomBytes(int64(len(entries)+1), size),
		})
	}
	add(other, 300<<10)
	add(start[0], 20<<10)
	add(start[1], 200<<10)
	add(start[2], 600<<10)
	add(start[3], 120<<10)
	entries = append(entries, tarEntry{hdr: tar.Header{Name: "usr/lib/libc-link.so", Typeflag: tar.TypeSymlink, Linkname: path.Base(start[2])}})
	data, desc := blobOf(t, entries)
	return openLayer(t, data, &testBlob{data: data}, desc, o), start, other
}

// waitPrefetched waits until l's fetches at mount (replay, prefetch list,
// start files) have returned.
func waitPrefetched(t *testing.T, l *Layer) {
	t.Helper()
	l.mu.Lock()
	done := l.prefetched
	l.mu.Unlock()
	<-done
}

// TestStartFilesFetchedAtMount: a layer without an access profile or a
// prefetch list fetches the files programs start with when it is mounted,
// before any read, and nothing else.
func TestStartFilesFetchedAtMount(t *testing.T) {
	l, start, other := startLayer(t, Options{})
	mountLayer(t, l)
	waitPrefetched(t, l)
	for _, name := range start {
		if !l.f.cachedFile(chunksOf(t, l, name)) {
			t.Errorf("%s is not in the chunk cache after the mount", name)
		}
	}
	if l.f.cachedFile(chunksOf(t, l, other)) {
		t.Errorf("%s, not a start file, was fetched at mount", other)
	}
}

// TestNoStartFilesWhenExact: a layer told to fetch only what reads need
// fetches nothing at mount.
func TestNoStartFilesWhenExact(t *testing.T) {
	l, start, _ := startLayer(t, Options{MinRequest: -1})
	mountLayer(t, l)
	waitPrefetched(t, l)
	for _, name := range start {
		if l.f.cachedFile(chunksOf(t, l, name)) {
			t.Errorf("%s was fetched at mount by a layer told to fetch only what reads need", name)
		}
	}
}
