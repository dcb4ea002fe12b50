package testimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"strings"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/script/internal/registry"
)

// fetch GETs /v2/<repo>/<what> from addr, sending accept as Accept.
func fetch(t *testing.T, addr, repo, what, accept string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://"+addr+"/v2/"+repo+"/"+what, nil)
	if err != nil {
		t.Fatal(err)
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s: %s", what, resp.Status, b)
	}
	return resp, b
}

// pulled is an image read back from the registry.
type pulled struct {
	manifest ocispec.Manifest
	config   ocispec.Image
	blobs    [][]byte // layer blobs, in manifest order
}

// pull reads repo:tag back and checks that every digest, size and media
// type is consistent with what Push returned.
func pull(t *testing.T, addr, repo, tag string, want digest.Digest, layers []ocispec.Descriptor) pulled {
	t.Helper()
	resp, mb := fetch(t, addr, repo, "manifests/"+tag, ocispec.MediaTypeImageManifest)
	if ct := resp.Header.Get("Content-Type"); ct != ocispec.MediaTypeImageManifest {
		t.Errorf("manifest Content-Type = %q", ct)
	}
	if got := digest.FromBytes(mb); got != want {
		t.Fatalf("manifest digest = %s, Push returned %s", got, want)
	}
	var p pulled
	if err := json.Unmarshal(mb, &p.manifest); err != nil {
		t.Fatal(err)
	}
	m := p.manifest
	if m.SchemaVersion != 2 || m.MediaType != ocispec.MediaTypeImageManifest || m.Config.MediaType != ocispec.MediaTypeImageConfig {
		t.Errorf("manifest header: %+v", m)
	}
	if len(m.Layers) != len(layers) {
		t.Fatalf("manifest has %d layers, Push returned %d", len(m.Layers), len(layers))
	}
	_, cb := fetch(t, addr, repo, "blobs/"+m.Config.Digest.String(), "")
	if digest.FromBytes(cb) != m.Config.Digest || int64(len(cb)) != m.Config.Size {
		t.Fatal("config blob does not match its descriptor")
	}
	if err := json.Unmarshal(cb, &p.config); err != nil {
		t.Fatal(err)
	}
	if p.config.OS != "linux" || p.config.Architecture != "amd64" || p.config.RootFS.Type != "layers" ||
		len(p.config.RootFS.DiffIDs) != len(layers) || len(p.config.History) != len(layers) {
		t.Errorf("config: %+v", p.config)
	}
	for i, l := range m.Layers {
		if l.Digest != layers[i].Digest || l.Size != layers[i].Size || l.MediaType != layers[i].MediaType {
			t.Errorf("layer %d: manifest %+v, Push returned %+v", i, l, layers[i])
		}
		_, b := fetch(t, addr, repo, "blobs/"+l.Digest.String(), "")
		if digest.FromBytes(b) != l.Digest || int64(len(b)) != l.Size {
			t.Fatalf("layer %d blob does not match its descriptor", i)
		}
		tarBytes := decompress(t, l.MediaType, b)
		if got := digest.FromBytes(tarBytes); got != p.config.RootFS.DiffIDs[i] {
			t.Errorf("layer %d: diffID %s, config says %s", i, got, p.config.RootFS.DiffIDs[i])
		}
		p.blobs = append(p.blobs, tarBytes)
	}
	return p
}

func decompress(t *testing.T, mediaType string, b []byte) []byte {
	t.Helper()
	var r io.Reader
	switch mediaType {
	case ocispec.MediaTypeImageLayerGzip:
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		r = zr
	case ocispec.MediaTypeImageLayerZstd:
		zr, err := zstd.NewReader(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		r = zr
	case ocispec.MediaTypeImageLayer:
		return b
	default:
		t.Fatalf("unexpected layer media type %q", mediaType)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("decompress %s: %v", mediaType, err)
	}
	return out
}

// contentSum returns the sha256 and size of an entry's content.
func contentSum(t *testing.T, e Entry) (string, int64) {
	t.Helper()
	h := sha256.New()
	if e.Body == nil {
		h.Write(e.Content)
		return fmt.Sprintf("%x", h.Sum(nil)), int64(len(e.Content))
	}
	r, size, err := e.Body.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil)), size
}

// checkTar checks that tarBytes holds exactly entries, header by header.
func checkTar(t *testing.T, layer int, tarBytes []byte, entries []Entry) {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(tarBytes))
	for i, e := range entries {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("layer %d entry %d (%q): %v", layer, i, e.Name, err)
		}
		want := e.ModTime
		if want.IsZero() {
			want = DefaultModTime()
		}
		if h.Name != e.Name || h.Typeflag != byte(e.Type) || h.Mode != e.Mode || h.Uid != e.Uid || h.Gid != e.Gid ||
			!h.ModTime.Equal(want) || h.Linkname != e.Linkname || h.Devmajor != e.Devmajor || h.Devminor != e.Devminor {
			t.Errorf("layer %d entry %d: header %+v does not match %+v", layer, i, h, e)
			continue
		}
		xattrs := map[string]string{}
		for k, v := range h.PAXRecords {
			if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				xattrs[name] = v
			}
		}
		if !maps.Equal(xattrs, e.Xattrs) && (len(xattrs) > 0 || len(e.Xattrs) > 0) {
			t.Errorf("layer %d %q: xattrs %q, want %q", layer, e.Name, xattrs, e.Xattrs)
		}
		if e.Type == TypeReg {
			sum, size := contentSum(t, e)
			h2 := sha256.New()
			n, err := io.Copy(h2, tr)
			if err != nil || n != size || fmt.Sprintf("%x", h2.Sum(nil)) != sum {
				t.Errorf("layer %d %q: content %d bytes (%v), want %d bytes sha256 %s", layer, e.Name, n, err, size, sum)
			}
		}
	}
	if h, err := tr.Next(); !errors.Is(err, io.EOF) {
		t.Errorf("layer %d: extra entry %v or error %v after the spec's entries", layer, h, err)
	}
}

func TestPushTricky(t *testing.T) {
	reg := registry.StartT(t)
	img := Tricky()
	dgst, layers, err := Push(t.Context(), reg.Addr(), "lazylayer/tricky:v1", img)
	if err != nil {
		t.Fatalf("Push: %v", err)
	}
	wantTypes := []string{
		ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd, ocispec.MediaTypeImageLayer,
		ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd,
	}
	if len(layers) != len(wantTypes) {
		t.Fatalf("%d layers, want %d", len(layers), len(wantTypes))
	}
	for i, l := range layers {
		if l.MediaType != wantTypes[i] {
			t.Errorf("layer %d media type %s, want %s", i, l.MediaType, wantTypes[i])
		}
	}
	p := pull(t, reg.Addr(), "lazylayer/tricky", "v1", dgst, layers)
	for i, l := range img.Layers {
		checkTar(t, i, p.blobs[i], l.Entries)
	}
	if got := p.config.Config.Cmd; len(got) != 1 || got[0] != "/bin/sh" {
		t.Errorf("config Cmd = %q", got)
	}
}

// TestPushAgain checks that pushing is deterministic and that a second push
// uploads no blob the registry already has.
func TestPushAgain(t *testing.T) {
	reg := registry.StartT(t)
	proxy, err := registry.NewProxy(reg.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })

	img := Busybox(Layer{Compression: None, Entries: []Entry{File("extra.txt", 0o600, "extra\n")}})
	first, layers, err := Push(t.Context(), proxy.Addr(), "busybox:1", img)
	if err != nil {
		t.Fatal(err)
	}
	pull(t, reg.Addr(), "busybox", "1", first, layers)
	proxy.Reset()
	second, _, err := Push(t.Context(), proxy.Addr(), "busybox:2", img)
	if err != nil {
		t.Fatal(err)
	}
	if first != second {
		t.Errorf("same image pushed twice: manifest digests %s and %s", first, second)
	}
	for _, r := range proxy.Requests() {
		if r.Method != http.MethodHead && !strings.Contains(r.Path, "/manifests/") {
			t.Errorf("second push sent %s %s", r.Method, r.Path)
		}
	}
}

func TestPushRawAndLarge(t *testing.T) {
	reg := registry.StartT(t)
	var raw bytes.Buffer
	err := WriteTar(&raw, []Entry{
		File("../escape", 0o644, "outside\n"),
		File("/etc/absolute", 0o644, "absolute\n"),
		Symlink("link", "/tmp"),
		File("link/through", 0o644, "through a symlink\n"),
	})
	if err != nil {
		t.Fatal(err)
	}
	truncated := raw.Bytes()[:700]
	img := Large(4, 2)
	img.Layers = append(img.Layers, RawLayer(raw.Bytes(), Gzip), RawLayer(truncated, None))
	dgst, layers, err := Push(t.Context(), reg.Addr(), "large:small", img)
	if err != nil {
		t.Fatal(err)
	}
	p := pull(t, reg.Addr(), "large", "small", dgst, layers)
	n := len(layers)
	if !bytes.Equal(p.blobs[n-2], raw.Bytes()) || !bytes.Equal(p.blobs[n-1], truncated) {
		t.Error("raw layers not stored verbatim")
	}
	var total int64
	for _, tb := range p.blobs[1 : n-2] {
		tr := tar.NewReader(bytes.NewReader(tb))
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			total += h.Size
		}
	}
	if total != 4<<20 {
		t.Errorf("Large(4, 2) holds %d bytes of files, want %d", total, 4<<20)
	}
}

func TestSplitRepoTag(t *testing.T) {
	for _, tc := range []struct{ in, repo, tag string }{
		{"a/b:c", "a/b", "c"},
		{"a/b", "a/b", "latest"},
		{"localhost:5000/x", "localhost:5000/x", "latest"},
		{"x:", "", ""},
		{"x@sha256:00", "", ""},
	} {
		repo, tag, err := splitRepoTag(tc.in)
		if repo != tc.repo || tag != tc.tag || (err != nil) != (tc.repo == "") {
			t.Errorf("splitRepoTag(%q) = %q, %q, %v", tc.in, repo, tag, err)
		}
	}
}
