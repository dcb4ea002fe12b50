package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// TestConvertIndex converts an index with two platforms of one annotated
// image and an attestation, and checks what is kept and what left out.
func TestConvertIndex(t *testing.T) {
	addr := startRegistry(t)
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	pushSample(t, addr, "busybox:v1", "busybox")
	ctx := t.Context()
	r := testResolver(t)
	src := addr + "/busybox"

	// The sample manifest, annotated, and an index of it.
	desc, err := r.Resolve(ctx, src+":v1")
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.Manifest(ctx, src, desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	m.Annotations = map[string]string{"org.opencontainers.image.title": "busybox & <friends>"}
	m.Layers[1].Annotations = map[string]string{"org.example.layer": "kept", estargz.TOCJSONDigestAnnotation: "sha256:stale"}
	mb, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	mdgst, err := r.PushManifest(ctx, src+"@"+digest.FromBytes(mb).String(), ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		t.Fatal(err)
	}
	// An attestation of it, as BuildKit lists them; its content matters not.
	att, err := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: m.Config, Layers: []ocispec.Descriptor{},
	})
	if err != nil {
		t.Fatal(err)
	}
	attDigest, err := r.PushManifest(ctx, src+"@"+digest.FromBytes(att).String(), ocispec.MediaTypeImageManifest, att)
	if err != nil {
		t.Fatal(err)
	}
	entry := func(arch string) ocispec.Descriptor {
		return ocispec.Descriptor{
			MediaType: ocispec.MediaTypeImageManifest, Digest: mdgst, Size: int64(len(mb)),
			Platform:    &ocispec.Platform{OS: "linux", Architecture: arch},
			Annotations: map[string]string{"org.example.arch": arch},
		}
	}
	idx := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{entry("amd64"), entry("arm64"), {
			MediaType: ocispec.MediaTypeImageManifest, Digest: attDigest, Size: int64(len(att)),
			Platform:    &ocispec.Platform{OS: "unknown", Architecture: "unknown"},
			Annotations: map[string]string{attestationType: "attestation-manifest"},
		}},
		Annotations: map[string]string{"org.example.index": "kept"},
	}
	ib, err := json.Marshal(idx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.PushManifest(ctx, src+":multi", ocispec.MediaTypeImageIndex, ib); err != nil {
		t.Fatal(err)
	}

	dst := addr + "/converted/busybox:multi"
	stdout, stderr, err := runCLI(ctx, t, "convert", "--hosts-dir", t.TempDir(), src+":multi", dst)
	if err != nil {
		t.Fatalf("convert: %v\nstderr:\n%s", err, stderr)
	}
	t.Logf("stderr:\n%s", stderr)
	for _, want := range []string{"leaving out attestation manifest", "linux/amd64 layer 1/2 sha256:", "linux/amd64 layer 2/2 sha256:"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q", want)
		}
	}
	got, err := r.Resolve(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	if stdout != dst+"@"+got.Digest.String()+"\n" || got.MediaType != ocispec.MediaTypeImageIndex {
		t.Fatalf("stdout %q; %s resolves to %+v", stdout, dst, got)
	}
	out, err := r.Index(ctx, dst, got.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if out.Annotations["org.example.index"] != "kept" || len(out.Manifests) != 2 {
		t.Fatalf("index %+v: want its annotation and two manifests", out)
	}
	for i, arch := range []string{"amd64", "arm64"} {
		e := out.Manifests[i]
		if e.Platform == nil || e.Platform.Architecture != arch || e.Annotations["org.example.arch"] != arch ||
			e.MediaType != ocispec.MediaTypeImageManifest || e.Digest != out.Manifests[0].Digest {
			t.Errorf("manifest %d: %+v", i, e)
		}
	}
	cm, err := r.Manifest(ctx, dst, out.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	if cm.Annotations["org.opencontainers.image.title"] != "busybox & <friends>" {
		t.Errorf("manifest annotations %v", cm.Annotations)
	}
	if a := cm.Layers[1].Annotations; a["org.example.layer"] != "kept" || a[estargz.TOCJSONDigestAnnotation] == "sha256:stale" {
		t.Errorf("layer annotations %v: want org.example.layer kept and a new TOC digest", a)
	}
	checkImage(ctx, t, src+":v1", dst+"@"+out.Manifests[0].Digest.String(), out.Manifests[0].Digest, false, false, 0)
}

// TestConvertDockerTypes converts a docker manifest list of a docker schema 2
// manifest: the result has OCI media types throughout.
func TestConvertDockerTypes(t *testing.T) {
	addr := startRegistry(t)
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	pushSample(t, addr, "busybox:v1", "busybox")
	ctx := t.Context()
	r := testResolver(t)
	src := addr + "/busybox"
	desc, err := r.Resolve(ctx, src+":v1")
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.Manifest(ctx, src, desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	m.MediaType = images.MediaTypeDockerSchema2Manifest
	m.Config.MediaType = images.MediaTypeDockerSchema2Config
	m.Layers[0].MediaType = images.MediaTypeDockerSchema2LayerGzip
	m.Layers[1].MediaType = images.MediaTypeDockerSchema2LayerZstd
	mb, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	mdgst, err := r.PushManifest(ctx, src+"@"+digest.FromBytes(mb).String(), m.MediaType, mb)
	if err != nil {
		t.Fatal(err)
	}
	list := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"manifests":[{"mediaType":%q,"digest":%q,"size":%d,"platform":{"architecture":"amd64","os":"linux"}}]}`,
		images.MediaTypeDockerSchema2ManifestList, m.MediaType, mdgst, len(mb))
	if _, err := r.PushManifest(ctx, src+":docker", images.MediaTypeDockerSchema2ManifestList, []byte(list)); err != nil {
		t.Fatal(err)
	}

	dst := addr + "/converted/busybox:docker"
	if _, stderr, err := runCLI(ctx, t, "convert", "--zstdchunked", "--hosts-dir", t.TempDir(), src+":docker", dst); err != nil {
		t.Fatalf("convert: %v\nstderr:\n%s", err, stderr)
	}
	got, err := r.Resolve(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := r.Index(ctx, dst, got.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if got.MediaType != ocispec.MediaTypeImageIndex || idx.MediaType != ocispec.MediaTypeImageIndex ||
		len(idx.Manifests) != 1 || idx.Manifests[0].MediaType != ocispec.MediaTypeImageManifest {
		t.Fatalf("converted index %+v (%s)", idx, got.MediaType)
	}
	checkImage(ctx, t, src+":v1", dst+"@"+idx.Manifests[0].Digest.String(), idx.Manifests[0].Digest, true, false, 0)
}
