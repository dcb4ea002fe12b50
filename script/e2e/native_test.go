package e2e

import (
	"archive/tar"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
	"github.com/lazylayer/lazylayer/script/internal/treecmp"
)

// The native tests look at a container from inside with a small static
// program, the walker, bind-mounted read-only at /.e2e with a static
// busybox. Running the image's own find or sha256sum would open the image's
// binaries and libraries, and those opens are FUSE requests of their own:
// the walker lets a test count only what the tree walk or the reads it
// measures cost, and choose exactly which image files a container opened
// before its layers turned local.
const nativeToolsDir = "/.e2e"

// walkerSource is the walker. Its modes:
//
//	list ROOT             one JSON walkEntry per path under ROOT, like
//	                      find ROOT -xdev with lstat and every xattr
//	sum ROOT [SKIP...]    one JSON fileSum per regular file under ROOT
//	                      (-xdev), read in full, but the paths SKIP
//	read FILE...          one JSON fileSum per FILE
//	loop LOG SPEC...      read each SPEC (fd:PATH=SHA256, a file opened
//	                      once and read from offset 0 every round, or
//	                      open:PATH=SHA256, opened, read and closed every
//	                      round) in rounds for ever, appending
//	                      "round N ok" or "round N ERROR ..." to LOG
//	sleep                 block for ever
//
// Mount points (directories on another device than ROOT) are left out with
// what is under them, as find -xdev leaves that out: they are not the
// image's tree.
const walkerSource = `package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

type walkEntry struct {
	Path     []byte
	Mode     uint32
	Uid, Gid uint32
	Size     int64
	Target   []byte
	Xattrs   map[string][]byte
	Rdev     uint64
	Mtime    int64
	Dev, Ino, Nlink uint64
	Err      string
}

type fileSum struct {
	Path   []byte
	SHA256 string
	Err    string
}

var out = json.NewEncoder(os.Stdout)

func xattrCall(trap uintptr, p string, name string, buf []byte) (int, error) {
	pp, err := syscall.BytePtrFromString(p)
	if err != nil {
		return 0, err
	}
	var bp unsafe.Pointer
	if len(buf) > 0 {
		bp = unsafe.Pointer(&buf[0])
	}
	var n uintptr
	var e syscall.Errno
	if name == "" {
		n, _, e = syscall.Syscall(trap, uintptr(unsafe.Pointer(pp)), uintptr(bp), uintptr(len(buf)))
	} else {
		np, err := syscall.BytePtrFromString(name)
		if err != nil {
			return 0, err
		}
		n, _, e = syscall.Syscall6(trap, uintptr(unsafe.Pointer(pp)), uintptr(unsafe.Pointer(np)), uintptr(bp), uintptr(len(buf)), 0, 0)
	}
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func xattrs(p string) (map[string][]byte, error) {
	buf := make([]byte, 1<<16)
	n, err := xattrCall(syscall.SYS_LLISTXATTR, p, "", buf)
	if err != nil || n == 0 {
		return nil, err
	}
	m := map[string][]byte{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		val := make([]byte, 1<<16)
		k, err := xattrCall(syscall.SYS_LGETXATTR, p, name, val)
		if err != nil {
			return nil, fmt.Errorf("lgetxattr %s: %w", name, err)
		}
		m[name] = val[:k]
	}
	return m, nil
}

// walk calls fn for root and every path under it but directories on
// another device than root's (mount points) and what is under them. Like
// find -xdev it looks at the device of directories only: overlay reports
// the device of a lower layer's filesystem for its non-directories.
func walk(root string, fn func(p string, st *syscall.Stat_t, err error)) {
	var st syscall.Stat_t
	if err := syscall.Lstat(root, &st); err != nil {
		fn(root, nil, err)
		return
	}
	dev := st.Dev
	var visit func(p string, st *syscall.Stat_t)
	visit = func(p string, st *syscall.Stat_t) {
		fn(p, st, nil)
		if st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
			return
		}
		d, err := os.Open(p)
		if err != nil {
			fn(p, nil, err)
			return
		}
		names, err := d.Readdirnames(-1)
		d.Close()
		if err != nil {
			fn(p, nil, err)
		}
		for _, n := range names {
			c := filepath.Join(p, n)
			var cst syscall.Stat_t
			if err := syscall.Lstat(c, &cst); err != nil {
				fn(c, nil, err)
				continue
			}
			if cst.Mode&syscall.S_IFMT == syscall.S_IFDIR && cst.Dev != dev {
				continue // a mount point
			}
			visit(c, &cst)
		}
	}
	visit(root, &st)
}

func list(root string) {
	walk(root, func(p string, st *syscall.Stat_t, err error) {
		e := walkEntry{Path: []byte(p)}
		if err != nil {
			e.Err = err.Error()
			out.Encode(e)
			return
		}
		e.Mode, e.Uid, e.Gid, e.Size = st.Mode, st.Uid, st.Gid, st.Size
		e.Rdev, e.Dev, e.Ino, e.Nlink = st.Rdev, st.Dev, st.Ino, st.Nlink
		e.Mtime = st.Mtim.Sec*1e9 + st.Mtim.Nsec
		if st.Mode&syscall.S_IFMT == syscall.S_IFLNK {
			t, err := os.Readlink(p)
			if err != nil {
				e.Err = err.Error()
			}
			e.Target = []byte(t)
		}
		x, err := xattrs(p)
		if err != nil {
			e.Err = err.Error()
		}
		e.Xattrs = x
		out.Encode(e)
	})
}

func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func sum(p string) {
	s := fileSum{Path: []byte(p)}
	h, err := hashFile(p)
	if err != nil {
		s.Err = err.Error()
	}
	s.SHA256 = h
	out.Encode(s)
}

type spec struct {
	kind, path, want string
	f                *os.File
}

func (s *spec) read() error {
	if s.kind == "open" {
		h, err := hashFile(s.path)
		if err != nil {
			return err
		}
		if h != s.want {
			return fmt.Errorf("sha256 %s, want %s", h, s.want)
		}
		return nil
	}
	if s.f == nil {
		f, err := os.Open(s.path)
		if err != nil {
			return err
		}
		s.f = f
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(s.f, 0, 1<<62)); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != s.want {
		return fmt.Errorf("sha256 %s, want %s", got, s.want)
	}
	return nil
}

func loop(log string, args []string) {
	lf, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var specs []*spec
	for _, a := range args {
		kind, rest, _ := strings.Cut(a, ":")
		path, want, _ := strings.Cut(rest, "=")
		specs = append(specs, &spec{kind: kind, path: path, want: want})
	}
	for _, s := range specs { // fd: files are opened before the first round
		if s.kind == "fd" {
			f, err := os.Open(s.path)
			if err != nil {
				fmt.Fprintf(lf, "round 0 ERROR open %s: %v\n", s.path, err)
				continue
			}
			s.f = f
		}
	}
	for round := 1; ; round++ {
		var bad []string
		for _, s := range specs {
			if err := s.read(); err != nil {
				bad = append(bad, fmt.Sprintf("%s:%s: %v", s.kind, s.path, err))
			}
		}
		line := fmt.Sprintf("round %d ok\n", round)
		if len(bad) > 0 {
			line = fmt.Sprintf("round %d ERROR %s\n", round, strings.Join(bad, "; "))
		}
		lf.Write([]byte(line))
		time.Sleep(20 * time.Millisecond) // pace only: leave the machine some CPU
	}
}

func main() {
	if len(os.Args) < 2 {
		os.Exit(2)
	}
	switch os.Args[1] {
	case "list":
		list(os.Args[2])
	case "sum":
		skip := map[string]bool{}
		for _, s := range os.Args[3:] {
			skip[s] = true
		}
		walk(os.Args[2], func(p string, st *syscall.Stat_t, err error) {
			if err != nil {
				out.Encode(fileSum{Path: []byte(p), Err: err.Error()})
				return
			}
			if st.Mode&syscall.S_IFMT == syscall.S_IFREG && !skip[p] {
				sum(p)
			}
		})
	case "read":
		for _, p := range os.Args[2:] {
			sum(p)
		}
	case "loop":
		loop(os.Args[2], os.Args[3:])
	case "sleep":
		for {
			time.Sleep(time.Hour)
		}
	default:
		os.Exit(2)
	}
}
`

// walkEntry and fileSum are what the walker prints.
type walkEntry struct {
	Path            []byte
	Mode            uint32
	Uid, Gid        uint32
	Size            int64
	Target          []byte
	Xattrs          map[string][]byte
	Rdev            uint64
	Mtime           int64
	Dev, Ino, Nlink uint64
	Err             string
}

type fileSum struct {
	Path   []byte
	SHA256 string
	Err    string
}

// nativeTools builds the walker and copies the host's static busybox into
// a directory of the env, which containers get at nativeToolsDir.
func (e *env) nativeTools() string {
	e.t.Helper()
	src := filepath.Join(e.dir, "walker-src")
	dir := filepath.Join(e.dir, "tools")
	writeFile(e.t, filepath.Join(src, "walker.go"), walkerSource)
	build := exec.Command("go", "build", "-o", filepath.Join(dir, "walker"), "walker.go")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		e.t.Fatalf("build the walker: %v\n%s", err, out)
	}
	bb, err := os.ReadFile(testimage.HostBusybox)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "busybox"), bb, 0o755); err != nil {
		e.t.Fatal(err)
	}
	return dir
}

// runDetached starts container id from ref with snapshotter sn and the
// native tools mounted at nativeToolsDir; env's cleanup stops it.
func (e *env) runDetached(sn, ref, id, tools string, args ...string) {
	e.t.Helper()
	e.ctr(append([]string{"run", "-d", "--snapshotter", sn,
		"--mount", "type=bind,src=" + tools + ",dst=" + nativeToolsDir + ",options=rbind:ro", ref, id}, args...)...)
}

// inside runs args in container id and returns its output; it fails the
// test if the command fails.
func (e *env) inside(id string, args ...string) string {
	e.t.Helper()
	return e.ctr(append([]string{"task", "exec", "--exec-id", fmt.Sprintf("x%d", time.Now().UnixNano()), id}, args...)...)
}

// walkList lists container id's root filesystem with the walker.
func (e *env) walkList(id string) map[string]walkEntry {
	e.t.Helper()
	out := e.inside(id, nativeToolsDir+"/walker", "list", "/")
	m := map[string]walkEntry{}
	dec := json.NewDecoder(strings.NewReader(out))
	for {
		var w walkEntry
		if err := dec.Decode(&w); err == io.EOF {
			break
		} else if err != nil {
			e.t.Fatalf("walker list in %s: %v", id, err)
		}
		if w.Err != "" {
			e.t.Errorf("walker list in %s: %s: %s", id, w.Path, w.Err)
		}
		m[string(w.Path)] = w
	}
	return m
}

// walkSums runs the walker's sum or read mode in container id and returns
// the sha256 of each file, or "ERROR ..." for a file it could not read.
func (e *env) walkSums(id string, args ...string) map[string]string {
	e.t.Helper()
	out := e.inside(id, append([]string{nativeToolsDir + "/walker"}, args...)...)
	m := map[string]string{}
	dec := json.NewDecoder(strings.NewReader(out))
	for {
		var s fileSum
		if err := dec.Decode(&s); err == io.EOF {
			break
		} else if err != nil {
			e.t.Fatalf("walker %s in %s: %v", args[0], id, err)
		}
		if s.Err != "" {
			m[string(s.Path)] = "ERROR " + s.Err
		} else {
			m[string(s.Path)] = s.SHA256
		}
	}
	return m
}

// treeOf turns a walker listing into what treecmp compares.
func treeOf(l map[string]walkEntry) map[string]treecmp.Info {
	m := make(map[string]treecmp.Info, len(l))
	for p, w := range l {
		info := treecmp.Info{
			Mode: w.Mode, Uid: w.Uid, Gid: w.Gid, Size: w.Size, Target: string(w.Target),
			Rdev: w.Rdev, Mtime: time.Unix(0, w.Mtime).UTC(), Dev: w.Dev, Ino: w.Ino, Nlink: w.Nlink,
		}
		if len(w.Xattrs) > 0 {
			info.Xattrs = map[string]string{}
			for k, v := range w.Xattrs {
				info.Xattrs[k] = string(v)
			}
		}
		m[p] = info
	}
	return m
}

// compareListings reports every difference between the listing of a
// container started lazily and one on containerd's overlayfs, but the
// root directory's mtime (the exact record makes names and mtimes exact).
func compareListings(t *testing.T, lazy, overlay map[string]walkEntry) {
	t.Helper()
	g, w := treeOf(lazy), treeOf(overlay)
	if len(w) < 1000 {
		t.Fatalf("the overlayfs container lists only %d paths", len(w))
	}
	if r, ok := g["/"]; ok {
		r.Mtime = w["/"].Mtime
		g["/"] = r
	}
	diffs := treecmp.Diff(g, w)
	for i, d := range diffs {
		if i == 50 {
			t.Errorf("… and %d more differences", len(diffs)-50)
			break
		}
		t.Errorf("lazy container vs overlayfs container: %s", d)
	}
}

// compareSums reports files whose sums differ between got and want, files
// in only one, and every read error in got.
func compareSums(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	bad := 0
	report := func(format string, args ...any) {
		if bad++; bad <= 30 {
			t.Errorf(what+": "+format, args...)
		}
	}
	for _, p := range slices.Sorted(mapKeys(got)) {
		if strings.HasPrefix(got[p], "ERROR") {
			report("%s: %s", p, got[p])
		} else if _, ok := want[p]; !ok {
			report("%s read (%s) but the overlayfs container lacks it", p, got[p])
		}
	}
	for _, p := range slices.Sorted(mapKeys(want)) {
		if g, ok := got[p]; !ok {
			report("%s was not read (the overlayfs container has it)", p)
		} else if g != want[p] && !strings.HasPrefix(g, "ERROR") {
			report("%s: sha256 %s, overlayfs %s", p, g, want[p])
		}
	}
	if bad > 30 {
		t.Errorf("%s: %d problems in all", what, bad)
	}
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// imageLayers returns the daemon's status of each of img's layers; it
// fails the test if one is missing.
func (e *env) imageLayers(img pushed) []layerstatus.Layer {
	e.t.Helper()
	all := e.status()
	var out []layerstatus.Layer
	for _, l := range img.layers {
		found := false
		for _, s := range all {
			if s.Digest == l.Digest.String() {
				out = append(out, s)
				found = true
			}
		}
		if !found {
			e.t.Fatalf("the daemon does not report layer %s", l.Digest)
		}
	}
	return out
}

// fuseRequests sums the FUSE requests img's layers answered.
func (e *env) fuseRequests(img pushed) int64 {
	e.t.Helper()
	var n int64
	for _, s := range e.imageLayers(img) {
		n += s.FUSERequests
	}
	return n
}

// checkNative reports the layers of img that are not served with native
// metadata, or not in state.
func (e *env) checkNative(img pushed, state string) {
	e.t.Helper()
	var bad []string
	layers := e.imageLayers(img)
	for _, s := range layers {
		if !s.Native || s.State != state {
			bad = append(bad, fmt.Sprintf("%s (native %v, %s)", s.Digest, s.Native, s.State))
		}
	}
	if len(bad) > 0 {
		e.t.Errorf("%d of the image's %d layers are not native and %s: %s", len(bad), len(layers), state, strings.Join(bad, ", "))
	}
}

// rootfsPath returns where container id's root filesystem is mounted.
func rootfsPath(t *testing.T, id string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if fields := strings.Fields(line); len(fields) > 4 && strings.HasSuffix(fields[4], "/"+id+"/rootfs") {
			return fields[4]
		}
	}
	t.Fatalf("no root filesystem mounted for container %s", id)
	return ""
}

// loopLog is what a walker loop wrote to LOG in its container.
type loopLog struct {
	rounds int      // rounds done
	errors []string // "round N ERROR ..." lines
}

func readLoopLog(t *testing.T, id, log string) loopLog {
	t.Helper()
	// The test's own lookup in the container's root may reach a lazy
	// layer's FUSE mount: a daemon that does not answer must fail the
	// test, not hang it (its cleanup ends the connection).
	type result struct {
		b   []byte
		err error
	}
	read := make(chan result, 1)
	path := filepath.Join(rootfsPath(t, id), log)
	go func() {
		b, err := os.ReadFile(path)
		read <- result{b, err}
	}()
	var r result
	select {
	case r = <-read:
	case <-time.After(time.Minute):
		t.Fatalf("reading %s of %s did not return within a minute: nothing answers a FUSE request", log, id)
	}
	b, err := r.b, r.err
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("read %s of %s: %v", log, id, err)
	}
	var l loopLog
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "round ") {
			if !strings.HasPrefix(line, "round 0 ") {
				l.rounds++
			}
			if strings.Contains(line, " ERROR ") {
				l.errors = append(l.errors, line)
			}
		}
	}
	return l
}

// waitRounds waits until the loop in container id logged at least n rounds.
func waitRounds(t *testing.T, id, log string, n int, d time.Duration) loopLog {
	t.Helper()
	var l loopLog
	waitForWithin(t, fmt.Sprintf("%d rounds of reads in %s", n, id), d, func() bool {
		l = readLoopLog(t, id, log)
		return l.rounds >= n
	})
	return l
}

// bodySHA256 is the sha256 of a body testimage generates.
func bodySHA256(t *testing.T, b testimage.Body) string {
	t.Helper()
	r, _, err := b.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func textSHA256(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// pullBoth pulls img with lazylayer and src with overlayfs.
func (e *env) pullBoth(img, src pushed) {
	e.t.Helper()
	for _, p := range []struct{ sn, ref string }{{"lazylayer", img.ref}, {"overlayfs", src.ref}} {
		if out, err := e.pull(p.sn, p.ref); err != nil {
			e.t.Fatalf("pull %s with %s: %v\n%s", p.ref, p.sn, err, out)
		}
	}
}

const manualPopulation = "[lazy]\n  populate = \"manual\"\n"

// TestNativePython: in a container started lazily from the python image,
// listing the whole root filesystem (lstat and xattrs of every path) makes
// no FUSE request and shows what a container on containerd's overlayfs
// shows, as far as a TOC can say; once the layers turned local, reading
// every file the container had not opened before, and running python,
// makes no FUSE request either, and every file reads the overlayfs bytes.
func TestNativePython(t *testing.T) {
	reg, proxy := startRegistry(t)
	e := newEnv(t, reg.Addr(), proxy.Addr(), manualPopulation)
	src := pythonImage(t, reg.Addr())
	img := e.convert(src, "e2e/python:native")
	e.pullBoth(img, src)
	tools := e.nativeTools()
	e.runDetached("lazylayer", img.ref, "py-native", tools, nativeToolsDir+"/walker", "sleep")
	e.runDetached("overlayfs", src.ref, "py-overlay", tools, nativeToolsDir+"/walker", "sleep")
	e.checkNative(img, layerstatus.StateLazy)
	t.Logf("lowerdir of the lazily started container: %s", strings.Join(rootfsLowers(t, "py-native"), ":"))

	before := e.fuseRequests(img)
	lazyList := e.walkList("py-native")
	if n := e.fuseRequests(img) - before; n != 0 {
		t.Errorf("listing %d paths (lstat, readlink, xattrs) in the lazily started container made %d FUSE requests, want 0", len(lazyList), n)
	} else {
		t.Logf("listing %d paths in the lazily started container made no FUSE request", len(lazyList))
	}
	compareListings(t, lazyList, e.walkList("py-overlay"))

	// The container opens a few files while its layers are lazy: these it
	// keeps reading through FUSE after the swap.
	early := []string{"/usr/bin/python3.11", "/usr/lib/python3.11/json/__init__.py", "/usr/lib/os-release"}
	before = e.fuseRequests(img)
	earlySums := e.walkSums("py-native", append([]string{"read"}, early...)...)
	if n := e.fuseRequests(img) - before; n <= 0 {
		t.Errorf("reading %d files while lazy made %d FUSE requests: are they counted?", len(early), n)
	} else {
		t.Logf("reading %d files while lazy made %d FUSE requests", len(early), n)
	}
	for _, p := range early {
		if s := earlySums[p]; s == "" || strings.HasPrefix(s, "ERROR") {
			t.Errorf("reading %s while lazy: %q", p, s)
		}
	}

	e.populate()
	e.checkNative(img, layerstatus.StateLocal)
	before = e.fuseRequests(img)
	lazySums := e.walkSums("py-native", append([]string{"sum", "/"}, early...)...)
	after := e.fuseRequests(img)
	if after > before {
		t.Errorf("after population, reading the %d files the container had not opened made %d FUSE requests, want 0", len(lazySums), after-before)
	} else if after < before {
		t.Logf("fuse_requests went from %d to %d while the container read its files (counter reset?)", before, after)
	} else {
		t.Logf("after population, reading %d files made no FUSE request", len(lazySums))
	}
	want := e.walkSums("py-overlay", append([]string{"sum", "/"}, early...)...)
	if len(want) < 1000 {
		t.Fatalf("the overlayfs container read only %d files", len(want))
	}
	compareSums(t, "files first read after population", lazySums, want)

	// Python, whose files the container now opens for the first time since
	// the swap (the sums above opened them first), runs natively.
	before = e.fuseRequests(img)
	if out := e.inside("py-native", "python3", "-c", `import json, http.server; print("hi")`); out != "hi\n" {
		t.Errorf("python printed %q", out)
	}
	if n := e.fuseRequests(img) - before; n > 0 {
		// Only a file bound to FUSE before population may still reach
		// it (the interpreter's own files were opened while lazy).
		var bound int64
		for _, s := range e.imageLayers(img) {
			bound += s.FUSEBound
		}
		if bound == 0 {
			t.Errorf("running python after population made %d FUSE requests with no file bound to FUSE, want 0", n)
		} else {
			t.Logf("running python after population made %d FUSE requests (%d files bound to FUSE before population)", n, bound)
		}
	}

	// The files opened before population stay bound to FUSE: record what
	// reading them costs now.
	before = e.fuseRequests(img)
	again := e.walkSums("py-native", append([]string{"read"}, early...)...)
	for _, p := range early {
		if again[p] != earlySums[p] {
			t.Errorf("%s, opened before population, reads %q after it, before %q", p, again[p], earlySums[p])
		}
	}
	var bound int64
	for _, s := range e.imageLayers(img) {
		bound += s.FUSEBound
	}
	t.Logf("reading the %d files opened before population again made %d FUSE requests; fuse_bound is %d", len(early), e.fuseRequests(img)-before, bound)
}

// nativeDataLayer is a layer of files under /data: f00..f39 of 4 KiB to
// about 600 KiB, and big, 16 MiB.
func nativeDataLayer() testimage.Layer {
	es := []testimage.Entry{testimage.Dir("data", 0o755)}
	for i := range 40 {
		body := testimage.Random(uint64(1000+i), int64(4<<10+i*15<<10))
		name := fmt.Sprintf("data/f%02d", i)
		es = append(es, testimage.BigFile(name, 0o644, body))
	}
	es = append(es, testimage.BigFile("data/big", 0o644, testimage.Random(999, 16<<20)))
	return testimage.Layer{Compression: testimage.Gzip, Entries: es}
}

// dataSHA256 is the sha256 of each regular file of l, by path in the
// container.
func dataSHA256(t *testing.T, l testimage.Layer) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, e := range l.Entries {
		if e.Type != testimage.TypeReg {
			continue
		}
		if e.Body != nil {
			m["/"+e.Name] = bodySHA256(t, e.Body)
		} else {
			m["/"+e.Name] = textSHA256(string(e.Content))
		}
	}
	return m
}

// TestNativeCrash: the daemon is killed after population while a container
// started lazily runs: every file the container had not opened before
// reads without error and with the overlayfs bytes, and a file it opened
// after population and holds open keeps reading. The files it opened
// before population (bound to the FUSE mount) wait for the next daemon,
// which serves the connection the killed one left, and read right.
func TestNativeCrash(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), manualPopulation)
	data := nativeDataLayer()
	sums := dataSHA256(t, data)
	src := push(t, reg.Addr(), "e2e/native-crash:gzip", testimage.Busybox(data))
	img := e.convert(src, "e2e/native-crash:estargz")
	e.pullBoth(img, src)
	tools := e.nativeTools()

	// Opened before population and held open (read every round), and
	// opened and closed before population.
	heldEarly := []string{"/data/f00", "/data/big"}
	readEarly := []string{"/data/f01", "/data/f02", "/srv/hello.txt"}
	args := []string{nativeToolsDir + "/walker", "loop", "/tmp/early.log"}
	for _, p := range heldEarly {
		args = append(args, "fd:"+p+"="+sums[p])
	}
	e.runDetached("lazylayer", img.ref, "crash", tools, args...)
	e.runDetached("overlayfs", src.ref, "crash-ref", tools, nativeToolsDir+"/walker", "sleep")
	e.checkNative(img, layerstatus.StateLazy)
	if l := waitRounds(t, "crash", "/tmp/early.log", 2, 2*time.Minute); len(l.errors) > 0 {
		t.Errorf("reading while lazy: %v", l.errors)
	}
	for p, s := range e.walkSums("crash", append([]string{"read"}, readEarly...)...) {
		if strings.HasPrefix(s, "ERROR") {
			t.Errorf("reading %s while lazy: %s", p, s)
		}
	}

	e.populate()
	e.checkNative(img, layerstatus.StateLocal)
	heldLate := "/data/f03"
	e.ctr("task", "exec", "-d", "--exec-id", "late-hold", "crash",
		nativeToolsDir+"/walker", "loop", "/tmp/late.log", "fd:"+heldLate+"="+sums[heldLate])
	waitRounds(t, "crash", "/tmp/late.log", 1, time.Minute)
	openedBefore := append(slices.Clone(heldEarly), readEarly...)
	want := e.walkSums("crash-ref", append([]string{"sum", "/"}, openedBefore...)...)
	for _, s := range e.imageLayers(img) {
		t.Logf("layer %s: fuse_bound %d, fuse_requests %d", s.Digest, s.FUSEBound, s.FUSERequests)
	}

	e.lazy.stop(t, syscall.SIGKILL)
	t.Logf("killed the daemon (pid %d)", e.lazy.cmd.Process.Pid)
	early, late := readLoopLog(t, "crash", "/tmp/early.log"), readLoopLog(t, "crash", "/tmp/late.log")

	got := e.walkSums("crash", append([]string{"sum", "/"}, openedBefore...)...)
	delete(got, "/tmp/early.log")
	delete(got, "/tmp/late.log")
	compareSums(t, "after the daemon was killed, files the container had not opened", got, want)
	for p, s := range sums {
		if g, ok := got[p]; ok && !slices.Contains(openedBefore, p) && g != s {
			t.Errorf("after the daemon was killed %s reads %q, want sha256 %s", p, got[p], s)
		}
	}

	// The file opened after population keeps reading through its open fd.
	l := waitRounds(t, "crash", "/tmp/late.log", late.rounds+3, time.Minute)
	if len(l.errors) > len(late.errors) {
		t.Errorf("the file opened after population, held open, fails after the daemon was killed: %v", l.errors[len(late.errors):])
	}

	// A new daemon serves the FUSE connection the killed one left (kept
	// by the descriptor holder): the files opened before population, bound
	// to FUSE, read again, with the right bytes.
	os.Remove(e.lazySock)
	e.startLazylayer()
	e2 := waitRounds(t, "crash", "/tmp/early.log", early.rounds+3, time.Minute)
	t.Logf("files opened before population and held open (%v): %d rounds after the kill, %d failed; last: %q",
		heldEarly, e2.rounds-early.rounds, len(e2.errors)-len(early.errors), lastOf(e2.errors))
	if len(e2.errors) > 0 {
		t.Errorf("files opened before population and held open fail across the crash: %v", e2.errors)
	}
	wantEarly := e.walkSums("crash-ref", append([]string{"read"}, readEarly...)...)
	for p, s := range e.walkSums("crash", append([]string{"read"}, readEarly...)...) {
		if s != wantEarly[p] {
			t.Errorf("opened and closed before population, read again after the kill and a restart: %s: %s, want %s", p, s, wantEarly[p])
		}
	}

	// The new daemon serves a new container from the local layers.
	if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "after-crash", "sha256sum", heldLate); !strings.HasPrefix(out, sums[heldLate]) {
		t.Errorf("a container started after the restart printed %q", out)
	}
}

func lastOf(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[len(s)-1]
}

// TestNativeSwapRead: a file read continuously in a container started
// lazily, through one open fd and by opening it every round, reads the
// same bytes without an error while its layer is populated and turns
// local; the daemon reports the file bound to FUSE.
func TestNativeSwapRead(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), manualPopulation)
	data := nativeDataLayer()
	sums := dataSHA256(t, data)
	img := e.convert(push(t, reg.Addr(), "e2e/native-swap:gzip", testimage.Busybox(data)), "e2e/native-swap:estargz")
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	tools := e.nativeTools()
	e.runDetached("lazylayer", img.ref, "swapread", tools, nativeToolsDir+"/walker", "loop", "/tmp/loop.log",
		"fd:/data/big="+sums["/data/big"], "open:/data/big="+sums["/data/big"], "open:/data/f10="+sums["/data/f10"])
	e.checkNative(img, layerstatus.StateLazy)
	before := waitRounds(t, "swapread", "/tmp/loop.log", 2, 2*time.Minute)
	e.populate()
	e.checkNative(img, layerstatus.StateLocal)
	after := waitRounds(t, "swapread", "/tmp/loop.log", readLoopLog(t, "swapread", "/tmp/loop.log").rounds+3, 2*time.Minute)
	if len(after.errors) > 0 {
		t.Errorf("reading across population: %d of %d rounds failed:\n%s", len(after.errors), after.rounds, strings.Join(after.errors, "\n"))
	}
	t.Logf("%d rounds before population was released, %d in all", before.rounds, after.rounds)
	var bound int64
	for _, s := range e.imageLayers(img) {
		bound += s.FUSEBound
	}
	// The file read through a descriptor kept open is bound for sure; the
	// one opened afresh each round is bound only while the kernel keeps
	// its dentry.
	if bound < 1 {
		t.Errorf("fuse_bound of the image's layers is %d while the container reads a file it opened before population", bound)
	}
}

// TestNative40Layers: a 40-layer image runs lazily through containerd's
// own mount path, every layer native, and reads its bottom and top layers
// right, before and after population.
func TestNative40Layers(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), manualPopulation)
	var extra []testimage.Layer
	for i := 2; i < 40; i++ {
		extra = append(extra, testimage.Layer{Compression: testimage.Gzip, Entries: []testimage.Entry{
			testimage.Dir("l", 0o755),
			testimage.File(fmt.Sprintf("l/%02d", i), 0o644, fmt.Sprintf("layer %d\n", i)),
			testimage.File("top", 0o644, fmt.Sprintf("%d\n", i)),
		}})
	}
	img := e.convert(push(t, reg.Addr(), "e2e/forty:gzip", testimage.Busybox(extra...)), "e2e/forty:estargz")
	if len(img.layers) != 40 {
		t.Fatalf("the image has %d layers", len(img.layers))
	}
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	e.checkNative(img, layerstatus.StateLazy)
	script := "cat /l/02 /l/39 /top /etc/os-release; ls /l | wc -l; md5sum /bin/busybox | cut -c1-32"
	bb, err := os.ReadFile(testimage.HostBusybox)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("layer 2\nlayer 39\n39\nNAME=lazylayer-busybox\nID=lazylayer\n38\n%x\n", md5sum(bb))
	e.ctr("run", "-d", "--snapshotter", "lazylayer", img.ref, "forty", "sleep", "3600")
	lowers := rootfsLowers(t, "forty")
	t.Logf("the container's lowerdir option is %d bytes", len(strings.Join(lowers, ":")))
	if out := e.inside("forty", "sh", "-c", script); out != want {
		t.Errorf("the 40-layer container started lazily printed %q, want %q", out, want)
	}
	e.populate()
	e.checkNative(img, layerstatus.StateLocal)
	if out := e.inside("forty", "sh", "-c", script); out != want {
		t.Errorf("after population the 40-layer container printed %q, want %q", out, want)
	}
	if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "forty-late", "sh", "-c", script); out != want {
		t.Errorf("a 40-layer container started after population printed %q, want %q", out, want)
	}
}

// diffEntry is what a test compares of one entry of a diff tar.
type diffEntry struct {
	Type     byte
	Mode     int64
	Uid, Gid int
	Size     int64
	SHA256   string
	Linkname string
}

// containerDiff asks containerd for the diff of container id's snapshot
// against its parent (ctr snapshots diff, containerd's walking differ over
// the snapshotter's mounts), as an uncompressed tar.
func (e *env) containerDiff(sn, id string) map[string]diffEntry {
	e.t.Helper()
	out := e.ctr("snapshots", "--snapshotter", sn, "diff", "--media-type", "application/vnd.oci.image.layer.v1.tar", id)
	m := map[string]diffEntry{}
	tr := tar.NewReader(strings.NewReader(out))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		} else if err != nil {
			e.t.Fatalf("the diff of %s is not a tar: %v", id, err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			e.t.Fatalf("the diff of %s: %s: %v", id, h.Name, err)
		}
		d := diffEntry{Type: h.Typeflag, Mode: h.Mode, Uid: h.Uid, Gid: h.Gid, Size: h.Size, Linkname: h.Linkname}
		if h.Typeflag == tar.TypeReg {
			d.SHA256 = textSHA256(string(b))
		}
		m[strings.TrimSuffix(h.Name, "/")] = d
	}
	return m
}

// TestNativeCommitDiff: changes to lazily served files (an append, a
// chmod, a removal) made in a container started lazily, before and after
// population, give containerd the same diff as the same changes in a
// container on containerd's overlayfs: the appended file whole, the
// chmodded file with its new mode and its full content, a whiteout.
func TestNativeCommitDiff(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), manualPopulation)
	aBody, bBody := testimage.Text(21, 300<<10), testimage.Random(22, 200<<10)
	layer := testimage.Layer{Compression: testimage.Gzip, Entries: []testimage.Entry{
		testimage.Dir("data", 0o755),
		testimage.BigFile("data/a", 0o644, aBody),
		testimage.BigFile("data/b", 0o644, bBody),
		testimage.File("data/c", 0o644, "delete me\n"),
		testimage.File("data/keep", 0o644, "untouched\n"),
	}}
	src := push(t, reg.Addr(), "e2e/native-diff:gzip", testimage.Busybox(layer))
	img := e.convert(src, "e2e/native-diff:estargz")
	e.pullBoth(img, src)
	tools := e.nativeTools()
	bb := nativeToolsDir + "/busybox"
	change := []string{bb, "sh", "-c", fmt.Sprintf("echo appended >> /data/a && %s chmod 0600 /data/b && %s rm /data/c", bb, bb)}

	for _, c := range []struct{ sn, ref, id string }{
		{"lazylayer", img.ref, "diff-early"}, {"lazylayer", img.ref, "diff-late"}, {"overlayfs", src.ref, "diff-ref"},
	} {
		e.runDetached(c.sn, c.ref, c.id, tools, nativeToolsDir+"/walker", "sleep")
	}
	e.checkNative(img, layerstatus.StateLazy)
	e.inside("diff-ref", change...)
	e.inside("diff-early", change...)

	r, _, err := aBody.Open()
	if err != nil {
		t.Fatal(err)
	}
	aOrig, _ := io.ReadAll(r)
	r.Close()
	ref := e.containerDiff("overlayfs", "diff-ref")
	for name, w := range map[string]diffEntry{
		"data/a":     {Type: tar.TypeReg, Mode: 0o644, Size: int64(len(aOrig)) + 9, SHA256: textSHA256(string(aOrig) + "appended\n")},
		"data/b":     {Type: tar.TypeReg, Mode: 0o600, Size: 200 << 10, SHA256: bodySHA256(t, bBody)},
		"data/.wh.c": {Type: tar.TypeReg, SHA256: textSHA256("")},
	} {
		g, ok := ref[name]
		if !ok {
			t.Errorf("containerd's overlayfs diff lacks %s: %v", name, ref)
			continue
		}
		if name == "data/.wh.c" {
			g.Mode = 0 // a whiteout's mode says nothing
		}
		if g != w {
			t.Errorf("containerd's overlayfs diff: %s is %+v, want %+v", name, g, w)
		}
	}
	if _, ok := ref["data/keep"]; ok {
		t.Errorf("containerd's overlayfs diff has the untouched data/keep")
	}

	compare := func(what string, got map[string]diffEntry) {
		t.Helper()
		for _, name := range slices.Sorted(mapKeys(ref)) {
			if g, ok := got[name]; !ok {
				t.Errorf("%s: the diff lacks %s (%+v)", what, name, ref[name])
			} else if g != ref[name] {
				t.Errorf("%s: %s is %+v, overlayfs %+v", what, name, g, ref[name])
			}
		}
		for _, name := range slices.Sorted(mapKeys(got)) {
			if _, ok := ref[name]; !ok {
				t.Errorf("%s: the diff has %s (%+v), overlayfs's does not", what, name, got[name])
			}
		}
	}
	compare("changed while lazy, diffed while lazy", e.containerDiff("lazylayer", "diff-early"))

	e.populate()
	e.checkNative(img, layerstatus.StateLocal)
	e.inside("diff-late", change...)
	compare("changed while lazy, diffed after population", e.containerDiff("lazylayer", "diff-early"))
	compare("changed after population", e.containerDiff("lazylayer", "diff-late"))

	// The container itself reads its changed files right.
	for _, id := range []string{"diff-early", "diff-late"} {
		got := e.walkSums(id, "read", "/data/a", "/data/b", "/data/c")
		if got["/data/a"] != ref["data/a"].SHA256 || got["/data/b"] != ref["data/b"].SHA256 || !strings.Contains(got["/data/c"], "no such file") {
			t.Errorf("%s reads its changed files as %v", id, got)
		}
	}
}

func md5sum(b []byte) []byte {
	h := md5.Sum(b)
	return h[:]
}
