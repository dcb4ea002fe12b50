package e2e

import (
	"os/exec"
	"strings"
	"testing"

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
