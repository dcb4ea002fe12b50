package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// retag pushes the manifest of img, changed by edit, as repoTag.
func retag(t *testing.T, img pushed, repoTag string, edit func(*ocispec.Manifest)) pushed {
	t.Helper()
	host, rest, _ := strings.Cut(img.ref, "/")
	repo, _, _ := strings.Cut(rest, ":")
	var m ocispec.Manifest
	getJSON(t, fmt.Sprintf("http://%s/v2/%s/manifests/%s", host, repo, img.manifest), &m)
	edit(&m)
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	_, tag, _ := strings.Cut(repoTag, ":")
	req, _ := http.NewRequest(http.MethodPut, fmt.Sprintf("http://%s/v2/%s/manifests/%s", host, repo, tag), bytes.NewReader(b))
	req.Header.Set("Content-Type", ocispec.MediaTypeImageManifest)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push manifest %s: %s", repoTag, resp.Status)
	}
	return pushed{ref: host + "/" + repo + ":" + tag, manifest: digest.FromBytes(b), layers: img.layers}
}

// TestLazyTOCMismatch: a layer whose TOC does not match the digest in the
// manifest is never served lazily: lazylayer fetches and verifies it in
// full instead, and the container runs. The converted image also runs
// under containerd's own overlayfs snapshotter (eStargz is a valid gzip
// tar).
func TestLazyTOCMismatch(t *testing.T) {
	reg, _ := startRegistry(t)
	e := newEnv(t, reg.Addr(), reg.Addr(), "[lazy]\n  populate = \"manual\"\n")
	src := push(t, reg.Addr(), "e2e/toc:gzip", sampleImage("toc"))
	img := e.convert(src, "e2e/toc:estargz")

	bad := retag(t, img, "e2e/toc:lying", func(m *ocispec.Manifest) {
		m.Layers[2].Annotations["containerd.io/snapshot/stargz/toc.digest"] = digest.FromString("another TOC").String()
	})
	if out, err := e.pull("lazylayer", bad.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if n := len(e.lazyMounts()); n != len(img.layers)-1 {
		t.Errorf("%d lazy mounts, want %d: the layer whose TOC lies must not be mounted lazily", n, len(img.layers)-1)
	}
	if !strings.Contains(e.lazyLogText(), "cannot serve layer lazily; fetching it in full") {
		t.Error("the log does not say why the layer was fetched in full")
	}
	out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", bad.ref, "toc-run", "sh", "-c", "cat /hello; wc -c < /data/big")
	if out != "hello from toc\n8388608\n" {
		t.Errorf("container printed %q", out)
	}

	if out, err := e.pull("overlayfs", img.ref); err != nil {
		t.Fatalf("pull the eStargz image with overlayfs: %v\n%s", err, out)
	}
	out = e.ctr("run", "--rm", "--snapshotter", "overlayfs", img.ref, "overlay-run", "cat", "/hello")
	if out != "hello from toc\n" {
		t.Errorf("the eStargz image under overlayfs printed %q", out)
	}
}

// TestRestartLazy: after a restart lazy layers are mounted again from the
// TOC saved on disk, even with the registry unreachable, and their
// population resumes once it is back.
func TestRestartLazy(t *testing.T) {
	reg, proxy := startRegistry(t)
	e := newEnv(t, reg.Addr(), proxy.Addr(), "[lazy]\n  populate = \"manual\"\n")
	img := e.convert(push(t, reg.Addr(), "e2e/relazy:gzip", sampleImage("relazy")), "e2e/relazy:estargz")
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "before", "cat", "/hello"); out != "hello from relazy\n" {
		t.Fatalf("container printed %q", out)
	}

	if err := proxy.Refuse(); err != nil {
		t.Fatal(err)
	}
	e.restartLazylayer(syscall.SIGTERM)
	if n := len(e.lazyMounts()); n != len(img.layers) {
		t.Fatalf("with the registry unreachable, %d of %d lazy layers were mounted again", n, len(img.layers))
	}
	// What was read before is cached; the tree needs no registry.
	if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "offline", "sh", "-c", "cat /hello; ls /data"); out != "hello from relazy\nbig\n" {
		t.Errorf("with the registry unreachable the container printed %q", out)
	}

	// Population on again, registry back: every layer turns local.
	if err := proxy.Accept(); err != nil {
		t.Fatal(err)
	}
	writeFile(t, e.dir+"/lazylayer.toml", "[fetch]\n  range_size = \"1MiB\"\n[lazy]\n  populate_delay = \"0s\"\n  swap_grace = \"1s\"\n")
	e.restartLazylayer(syscall.SIGTERM)
	e.waitLocal(img, 2*time.Minute)
	if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "after", "sh", "-c", "md5sum /data/big | cut -c1-32"); len(strings.TrimSpace(out)) != 32 {
		t.Errorf("after population the container printed %q", out)
	}
}
