package e2e

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/script/internal/registry"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
	"github.com/lazylayer/lazylayer/script/internal/treecmp"
)

// convert runs `lazylayer convert` on src and returns the converted image.
func (e *env) convert(src pushed, dstTag string, args ...string) pushed {
	e.t.Helper()
	host, _, _ := strings.Cut(src.ref, "/")
	dst := host + "/" + dstTag
	cmdArgs := append([]string{"convert", "--hosts-dir", e.ctrHosts}, args...)
	cmdArgs = append(cmdArgs, src.ref, dst)
	out, err := exec.Command(lazylayerBin, cmdArgs...).Output()
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(ee.Stderr)
		}
		e.t.Fatalf("lazylayer convert %s: %v\n%s", src.ref, err, msg)
	}
	_, dgst, ok := strings.Cut(strings.TrimSpace(string(out)), "@")
	if !ok {
		e.t.Fatalf("lazylayer convert printed %q, want REF@DIGEST", out)
	}
	p := pushed{ref: dst, manifest: digest.Digest(dgst)}
	host, repo, _ := strings.Cut(dst, "/")
	repo, _, _ = strings.Cut(repo, ":")
	var m struct {
		Layers []struct {
			Digest digest.Digest `json:"digest"`
			Size   int64         `json:"size"`
		} `json:"layers"`
	}
	getJSON(e.t, "http://"+host+"/v2/"+repo+"/manifests/"+dgst, &m)
	for _, l := range m.Layers {
		p.layers = append(p.layers, ocispec.Descriptor{Digest: l.Digest, Size: l.Size})
	}
	return p
}

// lazyMounts lists lazylayer's FUSE mounts.
func (e *env) lazyMounts() []string {
	var lazy []string
	for _, mp := range mountsUnder(filepath.Join(e.lazyRoot, "snapshots")) {
		if strings.HasSuffix(mp, "/lazy") {
			lazy = append(lazy, mp)
		}
	}
	return lazy
}

// blobBytes sums what the proxy served for the image's layer blobs.
func blobBytes(stats map[string]registry.PathStats, p pushed) (served, total int64) {
	for _, l := range p.layers {
		total += l.Size
		for path, s := range stats {
			if strings.HasSuffix(path, "/blobs/"+l.Digest.String()) {
				served += s.Bytes
			}
		}
	}
	return served, total
}

// TestLazyPullAndRun: an eStargz image made by `lazylayer convert` is
// mounted lazily and its container runs before the layers are downloaded.
func TestLazyPullAndRun(t *testing.T) {
	reg, proxy := startRegistry(t)
	// Population off: what the registry serves is what reads needed.
	e := newEnv(t, reg.Addr(), proxy.Addr(), "[lazy]\n  populate = \"manual\"\n")
	src := push(t, reg.Addr(), "e2e/lazy:gzip", sampleImage("lazy"))
	img := e.convert(src, "e2e/lazy:estargz")

	proxy.Reset()
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if n := len(e.lazyMounts()); n != len(img.layers) {
		t.Fatalf("%d lazy FUSE mounts for %d eStargz layers\n%s", n, len(img.layers), e.lazyLogText())
	}
	// lazylayer status lists them as lazy, with their mountpoints.
	statusOut, err := exec.Command(lazylayerBin, "status", "--address", e.lazySock, "--json").Output()
	if err != nil {
		t.Fatalf("lazylayer status: %v", err)
	}
	var st layerstatus.Report
	if err := json.Unmarshal(statusOut, &st); err != nil {
		t.Fatalf("lazylayer status --json: %v\n%s", err, statusOut)
	}
	for _, l := range img.layers {
		found := false
		for _, s := range st.Layers {
			if s.Digest == l.Digest.String() {
				found = true
				if s.State != "lazy" || s.Mountpoint == "" || s.Size != l.Size {
					t.Errorf("status of %s: %+v, want lazy with a mountpoint and size %d", l.Digest, s, l.Size)
				}
			}
		}
		if !found {
			t.Errorf("lazylayer status does not list layer %s", l.Digest)
		}
	}
	if table, err := exec.Command(lazylayerBin, "status", "--address", e.lazySock).Output(); err != nil || !strings.Contains(string(table), "lazy") {
		t.Errorf("lazylayer status: %v\n%s", err, table)
	} else {
		t.Logf("lazylayer status:\n%s", table)
	}
	out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "lazy-run", "sh", "-c", "cat /hello /srv/hello.txt")
	if want := "hello from lazy\nhello from lazylayer\n"; out != want {
		t.Errorf("container printed %q, want %q", out, want)
	}
	served, total := blobBytes(proxy.Stats(), img)
	t.Logf("the registry served %d of %d layer bytes", served, total)
	if served*2 > total {
		t.Errorf("the registry served %d of %d layer bytes: the 8 MiB file nobody read was fetched", served, total)
	}
	if held := e.contentHas(img); len(held) > 0 {
		t.Errorf("containerd's content store holds layer blobs %v", held)
	}

	// The data nobody read is fetched when it is read, and is right.
	out = e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "lazy-big", "sh", "-c", "md5sum < /data/big")
	if out, err := e.pull("overlayfs", src.ref); err != nil {
		t.Fatalf("pull %s: %v\n%s", src.ref, err, out)
	}
	want := e.ctr("run", "--rm", "--snapshotter", "overlayfs", src.ref, "full-big", "sh", "-c", "md5sum < /data/big")
	if out != want {
		t.Errorf("lazily read /data/big has md5 %q, the full image %q", out, want)
	}
}

// TestLazyFidelity: the tricky image, converted to eStargz and mounted
// lazily, gives the root filesystem containerd's overlayfs gives for it,
// exactly: the exact record makes up for what the TOC cannot say.
func TestLazyFidelity(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), "[lazy]\n  populate = \"manual\"\n")
	src := push(t, reg.Addr(), "e2e/tricky:gzip", testimage.Tricky())
	img := e.convert(src, "e2e/tricky:estargz")
	for _, p := range []struct{ sn, ref string }{{"lazylayer", img.ref}, {"overlayfs", src.ref}} {
		if out, err := e.pull(p.sn, p.ref); err != nil {
			t.Fatalf("pull %s with %s: %v\n%s", p.ref, p.sn, err, out)
		}
	}
	if n := len(e.lazyMounts()); n != len(img.layers) {
		t.Fatalf("%d lazy FUSE mounts for %d eStargz layers", n, len(img.layers))
	}
	lazyView := e.mountView("lazylayer", "lazy-fidelity", img.chainID(t))
	overlayView := e.mountView("overlayfs", "overlay-fidelity", src.chainID(t))
	compareTrees(t, lazyView, overlayView)
}

// asTOCRecords is what an eStargz or zstd:chunked TOC can say of a file:
// the TOC is JSON with RFC 3339 times, so names that are not UTF-8 come out
// with U+FFFD and mtimes rounded to the second. A lazy view without a
// usable exact record can show no more; everything else must match
// exactly.
func asTOCRecords(tree map[string]treecmp.Info) map[string]treecmp.Info {
	out := make(map[string]treecmp.Info, len(tree))
	for name, info := range tree {
		b, _ := json.Marshal(name)
		var lossy string
		json.Unmarshal(b, &lossy)
		info.Mtime = info.Mtime.Round(time.Second)
		out[lossy] = info
	}
	return out
}

// compareTrees reports every difference between the trees got and want but
// the root directory's mtime, which is when the top layer was unpacked.
// normalize, if given, says what want can be expected to look like in got.
func compareTrees(t *testing.T, got, want string, normalize ...func(map[string]treecmp.Info) map[string]treecmp.Info) {
	t.Helper()
	ctx := context.Background()
	w, err := treecmp.Snapshot(ctx, want)
	if err != nil {
		t.Fatal(err)
	}
	g, err := treecmp.Snapshot(ctx, got)
	if err != nil {
		t.Fatal(err)
	}
	if len(w) < 100 {
		t.Fatalf("%s has only %d entries: the image did not unpack", want, len(w))
	}
	for _, n := range normalize {
		w = n(w)
	}
	if r, ok := g["/"]; ok {
		r.Mtime = w["/"].Mtime
		g["/"] = r
	}
	for _, d := range treecmp.Diff(g, w) {
		t.Errorf("lazylayer vs overlayfs: %s", d)
	}
	t.Logf("compared %d paths", len(w))
}

// TestLazyZstdChunked: a zstd:chunked image from lazylayer convert is
// mounted lazily too, and its files read right.
func TestLazyZstdChunked(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), "[lazy]\n  populate = \"manual\"\n")
	src := push(t, reg.Addr(), "e2e/zstd:gzip", sampleImage("zstd"))
	img := e.convert(src, "e2e/zstd:chunked", "--zstdchunked")
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if n := len(e.lazyMounts()); n != len(img.layers) {
		t.Fatalf("%d lazy FUSE mounts for %d zstd:chunked layers\n%s", n, len(img.layers), e.lazyLogText())
	}
	out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "zstd-run", "sh", "-c", "cat /hello; md5sum < /data/big")
	if out2, err := e.pull("overlayfs", src.ref); err != nil {
		t.Fatalf("pull %s: %v\n%s", src.ref, err, out2)
	}
	want := e.ctr("run", "--rm", "--snapshotter", "overlayfs", src.ref, "zstd-ref", "sh", "-c", "cat /hello; md5sum < /data/big")
	if out != want || !strings.HasPrefix(out, "hello from zstd\n") {
		t.Errorf("zstd:chunked image printed %q, the gzip image %q", out, want)
	}
}
