package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// TestConvertErrors checks the errors convert gives before it has anything
// to convert. Conversions themselves, against a real registry, are
// script/e2e's TestConvert*.
func TestConvertErrors(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	// A registry that has no manifests.
	var requests atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		if r.URL.Path == "/v2/" {
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = io.WriteString(w, `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}`)
	}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	hosts := t.TempDir()
	for _, tc := range []struct {
		name    string
		args    []string
		want    []string // in the error
		network bool     // whether the registry is asked
	}{
		{"missing tag", []string{addr + "/busybox:nope", addr + "/x:y"}, []string{addr + "/busybox:nope", "not found", "HTTP 404"}, true},
		{"destination digest", []string{addr + "/busybox:v1", addr + "/x@" + digest.FromString("x").String()}, []string{"DST", "has a digest"}, false},
		{"short name", []string{"busybox", addr + "/x:y"}, []string{"SRC: image reference \"busybox\": no repository"}, false},
		{"prioritize file", []string{"--prioritize", "/nonexistent/list", addr + "/busybox:v1", addr + "/x:y"}, []string{"--prioritize: open /nonexistent/list"}, false},
		{"chunk size", []string{"--chunk-size", "lots", addr + "/busybox:v1", addr + "/x:y"}, []string{"--chunk-size \"lots\""}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := requests.Load()
			var stdout, stderr bytes.Buffer
			c := &cli{stdout: &stdout, stderr: &stderr}
			err := c.run(t.Context(), append([]string{"convert", "--hosts-dir", hosts}, tc.args...))
			if err == nil {
				t.Fatalf("converted: %s", stdout.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q after a failure", stdout.String())
			}
			if asked := requests.Load() > before; asked != tc.network {
				t.Errorf("registry asked: %v, want %v", asked, tc.network)
			}
		})
	}
}

func TestLayerDescriptor(t *testing.T) {
	src := ocispec.Descriptor{
		MediaType: "application/vnd.docker.image.rootfs.diff.tar.gzip", Digest: digest.FromString("old"), Size: 3,
		URLs: []string{"https://example.com/blob"}, Data: []byte("old"),
		Annotations: map[string]string{"org.example": "kept", estargz.TOCJSONDigestAnnotation: "sha256:stale", zstdchunked.ManifestPositionAnnotation: "1:2:3:4"},
	}
	l := convertedLayer{
		mediaType: ocispec.MediaTypeImageLayerGzip, digest: digest.FromString("new"), size: 5,
		annotations: map[string]string{estargz.TOCJSONDigestAnnotation: "sha256:new", estargz.StoreUncompressedSizeAnnotation: "10"},
	}
	got := l.descriptor(src)
	want := ocispec.Descriptor{
		MediaType: l.mediaType, Digest: l.digest, Size: 5,
		Annotations: map[string]string{"org.example": "kept", estargz.TOCJSONDigestAnnotation: "sha256:new", estargz.StoreUncompressedSizeAnnotation: "10"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("descriptor:\n got %+v\nwant %+v", got, want)
	}
	if src.Annotations[estargz.TOCJSONDigestAnnotation] != "sha256:stale" {
		t.Errorf("the source descriptor's annotations changed: %v", src.Annotations)
	}
	if d := (convertedLayer{annotations: map[string]string{"k": "v"}}).descriptor(ocispec.Descriptor{}); d.Annotations["k"] != "v" {
		t.Errorf("no annotations added to a source without any: %v", d.Annotations)
	}
}

// TestConvertNotFound: converting an image the registry does not have says
// so in one line naming the reference, once however many hosts were asked,
// and asks each host once: a 404 is an answer, not an outage.
func TestConvertNotFound(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	var requests atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = io.WriteString(w, `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}`)
	}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	// The registry's hosts.toml names a mirror (here the registry itself)
	// before the registry.
	mirrored := t.TempDir()
	dir := filepath.Join(mirrored, strings.Replace(addr, ":", "_", 1)+"_")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", addr, addr)
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		hostsDir string
		hosts    int64
	}{
		{"one host", t.TempDir(), 1},
		{"mirror", mirrored, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := requests.Load()
			var stdout, stderr bytes.Buffer
			c := &cli{stdout: &stdout, stderr: &stderr}
			code := c.exitCode(c.run(t.Context(), []string{"convert", "--hosts-dir", tc.hostsDir, addr + "/busybox:nope", addr + "/x:y"}))
			out := stderr.String()
			t.Logf("exit %d: %s", code, out)
			if code != 1 || stdout.Len() != 0 {
				t.Errorf("exit %d, stdout %q; want 1 and nothing", code, stdout.String())
			}
			if lines := strings.Count(out, "\n"); lines != 1 {
				t.Errorf("%d lines on stderr, want 1", lines)
			}
			for _, want := range []string{addr + "/busybox:nope", "not found"} {
				if !strings.Contains(out, want) {
					t.Errorf("stderr does not say %q", want)
				}
			}
			if n := strings.Count(out, "404"); n != 1 {
				t.Errorf("stderr names the 404 %d times, want once", n)
			}
			if strings.Contains(out, "unavailable") {
				t.Error("stderr calls a 404 unavailable")
			}
			if asked := requests.Load() - before; asked != tc.hosts {
				t.Errorf("%d requests to %d hosts: a 404 was retried", asked, tc.hosts)
			}
		})
	}
}
