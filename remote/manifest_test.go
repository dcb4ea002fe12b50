package remote

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// testManifest returns an OCI manifest with layers, and its digest.
func testManifest(t *testing.T, layers ...ocispec.Descriptor) (digest.Digest, []byte) {
	t.Helper()
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{
			MediaType: ocispec.MediaTypeImageConfig,
			Digest:    digest.FromString("config"),
			Size:      6,
		},
		Layers: layers,
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return digest.FromBytes(b), b
}

func TestManifest(t *testing.T) {
	layer := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("layer"), Size: 5}
	good, goodBytes := testManifest(t, layer)
	docker := `{"schemaVersion":2,"mediaType":"` + mediaTypeDockerManifest + `","config":{"digest":"` +
		digest.FromString("c").String() + `","size":1},"layers":[{"digest":"` + layer.Digest.String() + `","size":5}]}`
	index := `{"schemaVersion":2,"mediaType":"` + ocispec.MediaTypeImageIndex + `","manifests":[]}`
	for _, tc := range []struct {
		name   string
		stored string // bytes served under the digest asked for; "" for none
		dgst   digest.Digest
		ref    string // "" for repository foo with tag latest
		want   error  // nil for success
		layers int
	}{
		{name: "oci", stored: string(goodBytes), dgst: good, layers: 1},
		{name: "digest in ref", stored: string(goodBytes), ref: "/foo@" + good.String(), layers: 1},
		{name: "docker schema2", stored: docker, dgst: digest.FromString(docker), layers: 1},
		{name: "digest mismatch", stored: string(goodBytes) + " ", dgst: good, want: ErrBadData},
		{name: "not json", stored: "<html>", dgst: digest.FromString("<html>"), want: ErrBadData},
		{name: "schema1", stored: `{"schemaVersion":1}`, dgst: digest.FromString(`{"schemaVersion":1}`), want: ErrBadData},
		{name: "bad layer digest", stored: strings.Replace(docker, "sha256:", "sha256:x", 2), dgst: digest.FromString(strings.Replace(docker, "sha256:", "sha256:x", 2)), want: ErrBadData},
		{name: "index", stored: index, dgst: digest.FromString(index), want: errdefs.ErrInvalidArgument},
		{name: "missing", dgst: good, want: ErrNotFound},
		{name: "no digest", ref: "/foo:latest", want: errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newRegistry(t)
			dgst := tc.dgst
			if dgst == "" {
				dgst = digest.Digest(strings.TrimPrefix(tc.ref, "/foo@"))
			}
			if tc.stored != "" {
				reg.addManifest(dgst, []byte(tc.stored))
			}
			ref := reg.host + "/foo:latest"
			if tc.ref != "" {
				ref = reg.host + tc.ref
			}
			m, err := NewResolver(testOptions(t)).Manifest(t.Context(), ref, tc.dgst)
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				if len(m.Layers) != tc.layers || m.Layers[0].Digest != layer.Digest {
					t.Errorf("got layers %v, want %d with %s", m.Layers, tc.layers, layer.Digest)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if tc.want == errdefs.ErrInvalidArgument && errors.Is(err, ErrBadData) {
				t.Errorf("%v is ErrBadData too", err)
			}
			if tc.stored != "" && !strings.Contains(err.Error(), dgst.String()) {
				t.Errorf("error %q does not name the digest", err)
			}
		})
	}
}

func FuzzDecodeManifest(f *testing.F) {
	f.Add([]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:` +
		strings.Repeat("a", 64) + `","size":1},"layers":[]}`))
	f.Add([]byte(`{"schemaVersion":2,"manifests":[]}`))
	f.Add([]byte(`{"schemaVersion":1}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeManifest(b)
		if err != nil {
			return
		}
		if m.SchemaVersion != 2 || m.Config.Digest.Validate() != nil {
			t.Errorf("accepted %q as %+v", b, m)
		}
		for _, l := range m.Layers {
			if l.Digest.Validate() != nil || l.Size < 0 {
				t.Errorf("accepted layer %+v", l)
			}
		}
	})
}
