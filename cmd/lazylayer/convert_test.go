package main

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
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
		{"missing tag", []string{addr + "/busybox:nope", addr + "/x:y"}, []string{"resolve manifest nope from " + addr + "/busybox", "404", "registry unavailable"}, true},
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
