package e2e

import (
	"encoding/base64"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// TestExactView: the tricky image, converted to eStargz and to
// zstd:chunked and mounted lazily with population held (every layer
// lazy), gives exactly the root filesystem containerd's overlayfs gives for
// the gzip image, names that are not UTF-8 and nanosecond mtimes included.
// Once populated, a new view is the same again (no format entries). The
// converted image still runs under containerd's overlayfs.
func TestExactView(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), manualPopulation)
	src := push(t, reg.Addr(), "e2e/exact:gzip", testimage.Tricky())
	if out, err := e.pull("overlayfs", src.ref); err != nil {
		t.Fatalf("pull %s with overlayfs: %v\n%s", src.ref, err, out)
	}
	overlayView := e.mountView("overlayfs", "exact-ref", src.chainID(t))

	for _, f := range []struct {
		name string
		args []string
	}{{"estargz", nil}, {"zstdchunked", []string{"--zstdchunked"}}} {
		img := e.convert(src, "e2e/exact:"+f.name, f.args...)
		if out, err := e.pull("lazylayer", img.ref); err != nil {
			t.Fatalf("%s: pull: %v\n%s", f.name, err, out)
		}
		layers := e.imageLayers(img)
		if len(layers) != len(img.layers) {
			t.Fatalf("%s: the daemon holds %d of the image's %d layers", f.name, len(layers), len(img.layers))
		}
		for _, l := range layers {
			if l.State != "lazy" || l.View != lazy.ViewExact {
				t.Errorf("%s: layer %s is %s with view %q, want lazy and exact", f.name, l.Digest, l.State, l.View)
			}
		}
		lazyView := e.mountView("lazylayer", "exact-lazy-"+f.name, img.chainID(t))
		t.Logf("%s, lazy:", f.name)
		compareTrees(t, lazyView, overlayView)

		e.populate()
		localView := e.mountView("lazylayer", "exact-local-"+f.name, img.chainID(t))
		t.Logf("%s, local:", f.name)
		compareTrees(t, localView, overlayView)
		// The lazy view did not change under its users either.
		compareTrees(t, lazyView, overlayView)

		if out, err := e.pull("overlayfs", img.ref); err != nil {
			t.Fatalf("%s: pull with overlayfs: %v\n%s", f.name, err, out)
		}
		out := e.ctr("run", "--rm", "--snapshotter", "overlayfs", img.ref, "exact-ovl-"+f.name, "cat", "/data/late/dup")
		if out != "second, wins\n" {
			t.Errorf("%s under overlayfs: cat /data/late/dup printed %q", f.name, out)
		}
	}
}

// TestExactRecordRefused: a converted image whose manifest gives its exact
// records another digest is served from the TOC's (approximate) view, not
// from the records, and the daemon says why, in the log and in status.
func TestExactRecordRefused(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), manualPopulation)
	src := push(t, reg.Addr(), "e2e/exactbad:gzip", testimage.Tricky())
	img := e.convert(src, "e2e/exactbad:estargz")
	bad := retag(t, img, "e2e/exactbad:bad", func(m *ocispec.Manifest) {
		for _, l := range m.Layers {
			l.Annotations[lazy.ExactDigestAnnotation] = digest.FromString("another record").String()
		}
	})
	for _, p := range []struct{ sn, ref string }{{"lazylayer", bad.ref}, {"overlayfs", src.ref}} {
		if out, err := e.pull(p.sn, p.ref); err != nil {
			t.Fatalf("pull %s with %s: %v\n%s", p.ref, p.sn, err, out)
		}
	}
	for _, l := range e.imageLayers(bad) {
		if l.State != "lazy" || !strings.HasPrefix(l.View, "approximate: exact record not used") || !strings.Contains(l.View, "digest") {
			t.Errorf("layer %s is %s with view %q, want lazy, approximate for its record's digest", l.Digest, l.State, l.View)
		}
	}
	if log := e.lazyLogText(); !strings.Contains(log, "lazy view is approximate: exact record not used") {
		t.Errorf("the daemon's log does not say the records were not used")
	}
	out, err := exec.Command(lazylayerBin, "status", "--address", e.lazySock).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "lazy view is approximate: exact record not used") {
		t.Errorf("lazylayer status: %v\n%s", err, out)
	}
	// What the TOC says, no more: the records were not used.
	lazyView := e.mountView("lazylayer", "exactbad-lazy", bad.chainID(t))
	overlayView := e.mountView("overlayfs", "exactbad-ref", src.chainID(t))
	compareTrees(t, lazyView, overlayView, asTOCRecords)
}

// TestExactPyc: a Python module whose source has a sub-second mtime, with
// the .pyc compiled for it, imported in a container started lazily (every
// layer lazy, population held): Python finds the .pyc fresh and uses it,
// and writes nothing to the container's upper directory. With the TOC's
// rounded mtime it would find it stale (the .pyc holds the whole second).
func TestExactPyc(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), manualPopulation)
	base := pythonTestImage(t)
	basePushed := push(t, reg.Addr(), "e2e/pycbase:gzip", base)
	if out, err := e.pull("overlayfs", basePushed.ref); err != nil {
		t.Fatalf("pull %s: %v\n%s", basePushed.ref, err, out)
	}
	// The .pyc, compiled by the image's own python for a source whose
	// mtime is 1700000000.7 (0.7 s rounds up: a TOC says ...001).
	out := e.ctr("run", "--rm", "--snapshotter", "overlayfs", basePushed.ref, "pyc-compile", "sh", "-c",
		`set -e; mkdir -p /t; printf 'VALUE = 42\n' > /t/mod.py; touch -d @1700000000.7 /t/mod.py
python3 -c 'import sys, py_compile; print(sys.implementation.cache_tag); py_compile.compile("/t/mod.py", cfile="/t/mod.pyc", dfile="/app/mod.py")'
base64 -w0 /t/mod.pyc`)
	tag, b64, ok := strings.Cut(out, "\n")
	pyc, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if !ok || err != nil || len(pyc) < 16 {
		t.Fatalf("compiling the module printed %q: %v", out, err)
	}
	mtime := time.Unix(1700000000, 700000000)
	base.Layers = append(base.Layers, testimage.Layer{Compression: testimage.Gzip, Entries: []testimage.Entry{
		{Name: "app/", Type: testimage.TypeDir, Mode: 0o755, ModTime: mtime},
		{Name: "app/mod.py", Type: testimage.TypeReg, Mode: 0o644, ModTime: mtime, Content: []byte("VALUE = 42\n")},
		{Name: "app/__pycache__/", Type: testimage.TypeDir, Mode: 0o755, ModTime: mtime},
		{Name: "app/__pycache__/mod." + tag + ".pyc", Type: testimage.TypeReg, Mode: 0o644, ModTime: mtime, Content: pyc},
	}})
	src := push(t, reg.Addr(), "e2e/pyc:gzip", base)
	img := e.convert(src, "e2e/pyc:estargz")
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	for _, l := range e.imageLayers(img) {
		if l.State != "lazy" || l.View != lazy.ViewExact {
			t.Errorf("layer %s is %s with view %q, want lazy and exact", l.Digest, l.State, l.View)
		}
	}
	out = e.ctr("run", "--snapshotter", "lazylayer", img.ref, "pyc-lazy", "sh", "-c",
		`python3 -v -c 'import sys; sys.path.insert(0, "/app"); import mod; print("value", mod.VALUE)' 2>&1`)
	t.Cleanup(func() { e.ctrOut("containers", "rm", "pyc-lazy") })
	if !strings.Contains(out, "value 42") {
		t.Fatalf("python printed:\n%s", out)
	}
	if want := "code object from '/app/__pycache__/mod." + tag + ".pyc'"; !strings.Contains(out, want) || strings.Contains(out, "bytecode is stale for 'mod'") {
		t.Errorf("python did not use the .pyc (want %q, no \"stale\"):\n%s", want, grepLines(out, "mod"))
	}
	// Nothing written to the container's upper directory.
	mounts := e.ctr("snapshots", "--snapshotter", "lazylayer", "mounts", "/x", "pyc-lazy")
	var upper string
	if i := strings.Index(mounts, "upperdir="); i >= 0 {
		upper, _, _ = strings.Cut(mounts[i+len("upperdir="):], ",")
	} else if m := regexp.MustCompile(`(/\S+/snapshots/[0-9]+/merged) `).FindStringSubmatch(mounts); m != nil {
		// The snapshot's overlay, mounted by lazylayer: its options are
		// in mountinfo.
		upper = overlayUpper(t, m[1])
	} else {
		t.Fatalf("no upper directory in the container's mounts: %s", mounts)
	}
	if ents, err := os.ReadDir(upper); err != nil {
		t.Fatalf("read upper directory %s: %v", upper, err)
	} else if len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("the container wrote to its upper directory: %v", names)
	}
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// overlayUpper returns the upper directory of the overlay mounted at mp.
func overlayUpper(t *testing.T, mp string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == mp {
			if i := strings.Index(line, "upperdir="); i >= 0 {
				upper, _, _ := strings.Cut(line[i+len("upperdir="):], ",")
				return strings.Fields(upper)[0]
			}
		}
	}
	t.Fatalf("no overlay with an upper directory mounted at %s", mp)
	return ""
}
