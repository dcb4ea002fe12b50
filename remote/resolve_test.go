package remote

import (
	"errors"
	"fmt"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestResolve(t *testing.T) {
	_, manifest := testManifest(t)
	index := []byte(`{"schemaVersion":2,"mediaType":"` + ocispec.MediaTypeImageIndex + `","manifests":[]}`)
	bare := []byte(`{"schemaVersion":2,"manifests":[]}`)
	dockerBare := []byte(`{"schemaVersion":2,"config":{"digest":"` + digest.FromString("c").String() + `","size":1},"layers":[]}`)
	for _, tc := range []struct {
		name        string
		stored      []byte // under tag "t" and its digest
		contentType string
		ref         string // after "host/foo"
		want        string // media type; "" for an error
		err         error
	}{
		{name: "oci manifest by tag", stored: manifest, ref: ":t", want: ocispec.MediaTypeImageManifest},
		{name: "index by tag", stored: index, ref: ":t", want: ocispec.MediaTypeImageIndex},
		{name: "by digest", stored: manifest, ref: "@" + digest.FromBytes(manifest).String(), want: ocispec.MediaTypeImageManifest},
		{name: "tag and digest", stored: manifest, ref: ":nope@" + digest.FromBytes(manifest).String(), want: ocispec.MediaTypeImageManifest},
		{name: "media type from header", stored: bare, contentType: mediaTypeDockerList + "; charset=utf-8", ref: ":t", want: mediaTypeDockerList},
		{name: "media type from shape", stored: bare, contentType: "application/json", ref: ":t", want: ocispec.MediaTypeImageIndex},
		{name: "docker manifest from header", stored: dockerBare, contentType: mediaTypeDockerManifest, ref: ":t", want: mediaTypeDockerManifest},
		{name: "wrong digest", stored: manifest, ref: "@" + digest.FromString("x").String(), err: ErrNotFound},
		{name: "missing tag", stored: manifest, ref: ":other", err: ErrNotFound},
		{name: "no tag", stored: manifest, ref: "", err: errdefs.ErrInvalidArgument},
		{name: "schema1", stored: []byte(`{"schemaVersion":1,"name":"foo"}`), ref: ":t", err: ErrBadData},
		{name: "other media type", stored: []byte(`{"schemaVersion":2,"mediaType":"text/plain"}`), ref: ":t", err: ErrBadData},
		{name: "not json", stored: []byte(`<html>`), ref: ":t", err: ErrBadData},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newPushRegistry(t)
			reg.put(storedManifest{mediaType: tc.contentType, b: tc.stored}, "t", digest.FromBytes(tc.stored).String())
			desc, err := NewResolver(testOptions(t)).Resolve(t.Context(), reg.host+"/foo"+tc.ref)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("got %+v, %v; want %v", desc, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := ocispec.Descriptor{MediaType: tc.want, Digest: digest.FromBytes(tc.stored), Size: int64(len(tc.stored))}
			if desc.MediaType != want.MediaType || desc.Digest != want.Digest || desc.Size != want.Size {
				t.Errorf("got %+v, want %+v", desc, want)
			}
		})
	}
}

func TestResolveDigestMismatch(t *testing.T) {
	reg := newPushRegistry(t)
	_, manifest := testManifest(t)
	claimed := digest.FromString("claimed")
	reg.put(storedManifest{b: manifest}, claimed.String())
	_, err := NewResolver(testOptions(t)).Resolve(t.Context(), reg.host+"/foo@"+claimed.String())
	if !errors.Is(err, ErrBadData) {
		t.Fatalf("got %v, want ErrBadData", err)
	}
}

func TestIndex(t *testing.T) {
	reg := newPushRegistry(t)
	mdgst, manifest := testManifest(t)
	index := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"manifests":[{"mediaType":%q,"digest":%q,"size":%d,"platform":{"architecture":"arm64","os":"linux"}}],"annotations":{"a":"b"}}`,
		mediaTypeDockerList, ocispec.MediaTypeImageManifest, mdgst, len(manifest)))
	badDesc := []byte(`{"schemaVersion":2,"manifests":[{"digest":"sha256:x","size":1}]}`)
	for _, b := range [][]byte{manifest, index, badDesc} {
		reg.put(storedManifest{b: b}, digest.FromBytes(b).String())
	}
	r := NewResolver(testOptions(t))
	idx, err := r.Index(t.Context(), reg.host+"/foo@"+digest.FromBytes(index).String(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(idx.Manifests) != 1 || idx.Manifests[0].Platform.Architecture != "arm64" || idx.Annotations["a"] != "b" {
		t.Errorf("index %+v", idx)
	}
	if _, err := r.Index(t.Context(), reg.host+"/foo", mdgst); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("manifest as index: got %v, want ErrInvalidArgument", err)
	}
	if _, err := r.Index(t.Context(), reg.host+"/foo", digest.FromBytes(badDesc)); !errors.Is(err, ErrBadData) {
		t.Errorf("bad descriptor: got %v, want ErrBadData", err)
	}
	if _, err := r.Index(t.Context(), reg.host+"/foo", "sha256:x"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("bad digest: got %v, want ErrInvalidArgument", err)
	}
}
