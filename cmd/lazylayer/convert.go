package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/docker/go-units"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/remote"
)

const (
	// defaultHostsDir is containerd's, as for the daemon.
	defaultHostsDir = "/etc/containerd/certs.d"

	// maxConfigSize bounds the image config read into memory.
	maxConfigSize = 64 << 20
	// maxIndexDepth bounds indexes nested in indexes.
	maxIndexDepth = 4

	// attestationType is the annotation with which BuildKit marks the
	// manifests in an index that attest another manifest.
	attestationType = "vnd.docker.reference.type"
)

const convertDescription = `Convert reads the image SRC (a manifest or an index, e.g.
registry.example.com/app:1.0) from its registry, rebuilds each layer as eStargz
(or zstd:chunked) so that lazylayer can pull it lazily, and pushes the result as
DST (e.g. registry.example.com/app:1.0-esgz). Everything else about the image is
kept. Each layer carries an exact record (.lazylayer.exact.json, right
before its TOC) of the names and sub-second mtimes a TOC cannot say, so that
a lazy view equals the extracted tree. Progress goes to stderr; the last
line on stdout is DST@<digest>.

Registry hosts, mirrors and TLS come from the hosts.toml directory, credentials
from docker's config.json ($DOCKER_CONFIG or ~/.docker). Layers are staged in
$TMPDIR, which needs room for the biggest layer uncompressed plus three
times its compressed size.
`

// convert is "lazylayer convert".
func (c *cli) convert(ctx context.Context, args []string) error {
	fl := c.flagSet("convert", "[flags] SRC DST", convertDescription)
	zstd := fl.Bool("zstdchunked", false, "build zstd:chunked layers instead of eStargz")
	prioritize := fl.String("prioritize", "", "`file` listing paths to place first in every layer, one per line (what containers read first at start)")
	hostsDir := fl.String("hosts-dir", defaultHostsDir, "containerd hosts.toml `directory` for registry hosts")
	chunkSize := fl.String("chunk-size", "", "`size` of the chunks big files are split into, e.g. 1MiB (default estargz's, 4MiB)")
	if err := parse(fl, args); err != nil {
		return err
	}
	if fl.NArg() != 2 {
		fmt.Fprintf(c.stderr, "lazylayer convert: want SRC and DST, got %d arguments\n", fl.NArg())
		fl.Usage()
		return errUsage
	}
	conv := &converter{
		r:           remote.NewResolver(remote.Options{HostsDir: *hostsDir}),
		zstdChunked: *zstd,
		log:         c.stderr,
		layers:      make(map[digest.Digest]convertedLayer),
		manifests:   make(map[digest.Digest]ocispec.Descriptor),
	}
	var err error
	if conv.src, err = imageRef(fl.Arg(0)); err != nil {
		return fmt.Errorf("SRC: %w", err)
	}
	if conv.dst, err = imageRef(fl.Arg(1)); err != nil {
		return fmt.Errorf("DST: %w", err)
	}
	if conv.dst.Digest() != "" {
		return fmt.Errorf("DST %s: has a digest; name a tag instead", fl.Arg(1))
	}
	if *chunkSize != "" {
		n, err := units.RAMInBytes(*chunkSize)
		if err != nil || n <= 0 || n > 1<<30 {
			return fmt.Errorf("--chunk-size %q: want a size between 1 byte and 1GiB", *chunkSize)
		}
		conv.chunkSize = int(n)
	}
	if *prioritize != "" {
		if conv.prioritized, err = readPaths(*prioritize); err != nil {
			return err
		}
	}
	dgst, err := conv.run(ctx)
	if err != nil {
		return err
	}
	conv.warnNotFound()
	_, err = fmt.Fprintf(c.stdout, "%s@%s\n", conv.dst.String(), dgst)
	return err
}

// imageRef parses a fully qualified image reference; without tag or digest
// it names the tag "latest".
func imageRef(s string) (reference.Spec, error) {
	spec, err := reference.Parse(s)
	if err == nil && !strings.Contains(spec.Locator, "/") {
		err = fmt.Errorf("no repository")
	}
	if err != nil {
		return reference.Spec{}, fmt.Errorf("image reference %q: %w (want registry/repository[:tag], e.g. docker.io/library/alpine:3.20)", s, err)
	}
	if spec.Object == "" {
		spec.Object = "latest"
	}
	return spec, nil
}

// readPaths reads the --prioritize file: one path per line, blank lines
// skipped.
func readPaths(name string) ([]string, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("--prioritize: %w", err)
	}
	defer f.Close()
	var paths []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if p := strings.TrimRight(sc.Text(), "\r"); strings.TrimSpace(p) != "" {
			paths = append(paths, p)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("--prioritize: read %s: %w", name, err)
	}
	return paths, nil
}

// converter converts one image and pushes it.
type converter struct {
	r           *remote.Resolver
	src, dst    reference.Spec
	zstdChunked bool
	prioritized []string // paths to place first in every layer
	chunkSize   int      // 0: estargz's default
	log         io.Writer

	// Work done, so that what an image lists twice is converted once.
	layers    map[digest.Digest]convertedLayer     // by source layer digest
	manifests map[digest.Digest]ocispec.Descriptor // by source manifest digest: pushed
	found     map[string]bool                      // prioritized paths some layer has
}

// run converts the image and pushes it under the DST tag. It returns the
// digest of the manifest or index pushed.
func (c *converter) run(ctx context.Context) (digest.Digest, error) {
	desc, err := c.r.Resolve(ctx, c.src.String())
	if err != nil {
		return "", err
	}
	var b []byte
	switch {
	case images.IsManifestType(desc.MediaType):
		b, err = c.image(ctx, desc, "")
		desc.MediaType = ocispec.MediaTypeImageManifest
	case images.IsIndexType(desc.MediaType):
		b, err = c.index(ctx, desc, 0)
		desc.MediaType = ocispec.MediaTypeImageIndex
	default:
		err = fmt.Errorf("%s is a %s, not an image", c.src.String(), desc.MediaType)
	}
	if err != nil {
		return "", err
	}
	return c.r.PushManifest(ctx, c.dst.String(), desc.MediaType, b)
}

// index converts every image of the index desc, pushes them by digest, and
// returns the new index. Attestation manifests are left out: they attest the
// images before conversion.
func (c *converter) index(ctx context.Context, desc ocispec.Descriptor, depth int) ([]byte, error) {
	if depth >= maxIndexDepth {
		return nil, fmt.Errorf("index %s: indexes nested more than %d deep", desc.Digest, maxIndexDepth)
	}
	idx, err := c.r.Index(ctx, c.src.String(), desc.Digest)
	if err != nil {
		return nil, err
	}
	out := idx
	out.Versioned = specs.Versioned{SchemaVersion: 2}
	out.MediaType = ocispec.MediaTypeImageIndex
	out.Manifests = nil
	for i, m := range idx.Manifests {
		if m.Annotations[attestationType] == "attestation-manifest" {
			fmt.Fprintf(c.log, "leaving out attestation manifest %s: it attests the unconverted image\n", shortDigest(m.Digest))
			continue
		}
		nd, err := c.child(ctx, m, depth)
		if err != nil {
			return nil, fmt.Errorf("index %s: manifest %d/%d %s%s: %w", shortDigest(desc.Digest), i+1, len(idx.Manifests), m.Digest, platformSuffix(m.Platform), err)
		}
		out.Manifests = append(out.Manifests, nd)
	}
	if len(out.Manifests) == 0 {
		return nil, fmt.Errorf("index %s lists no image to convert", desc.Digest)
	}
	return marshal(out)
}

// child converts the manifest or index an index lists, pushes it by digest
// and returns its new descriptor, with the platform and annotations kept.
func (c *converter) child(ctx context.Context, m ocispec.Descriptor, depth int) (ocispec.Descriptor, error) {
	nd, ok := c.manifests[m.Digest]
	if !ok {
		var b []byte
		var err error
		switch {
		case images.IsManifestType(m.MediaType):
			nd.MediaType = ocispec.MediaTypeImageManifest
			b, err = c.image(ctx, m, platformPrefix(m.Platform))
		case images.IsIndexType(m.MediaType):
			nd.MediaType = ocispec.MediaTypeImageIndex
			b, err = c.index(ctx, m, depth+1)
		default:
			err = fmt.Errorf("media type %q is neither an image manifest nor an index", m.MediaType)
		}
		if err != nil {
			return ocispec.Descriptor{}, err
		}
		nd.Digest = digest.FromBytes(b)
		nd.Size = int64(len(b))
		if _, err := c.r.PushManifest(ctx, c.dst.Locator+"@"+nd.Digest.String(), nd.MediaType, b); err != nil {
			return ocispec.Descriptor{}, err
		}
		c.manifests[m.Digest] = nd
	}
	out := m
	out.MediaType, out.Digest, out.Size = nd.MediaType, nd.Digest, nd.Size
	out.Data, out.URLs = nil, nil
	return out, nil
}

// image converts the layers of the image manifest desc, pushes them and the
// new config, and returns the new manifest (not pushed). prefix starts its
// progress lines.
func (c *converter) image(ctx context.Context, desc ocispec.Descriptor, prefix string) ([]byte, error) {
	m, err := c.r.Manifest(ctx, c.src.String(), desc.Digest)
	if err != nil {
		return nil, err
	}
	config, err := c.fetchConfig(ctx, m.Config)
	if err != nil {
		return nil, err
	}
	layers := make([]ocispec.Descriptor, len(m.Layers))
	diffIDs := make([]digest.Digest, len(m.Layers))
	for i, l := range m.Layers {
		cl, err := c.layer(ctx, l, fmt.Sprintf("%slayer %d/%d", prefix, i+1, len(m.Layers)))
		if err != nil {
			return nil, fmt.Errorf("%slayer %d/%d %s: %w", prefix, i+1, len(m.Layers), l.Digest, err)
		}
		layers[i], diffIDs[i] = cl.descriptor(l), cl.diffID
	}
	config, err = withDiffIDs(config, diffIDs)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", m.Config.Digest, err)
	}
	cfgDesc := m.Config
	if cfgDesc.MediaType == images.MediaTypeDockerSchema2Config {
		cfgDesc.MediaType = ocispec.MediaTypeImageConfig
	}
	cfgDesc.Digest, cfgDesc.Size, cfgDesc.Data = digest.FromBytes(config), int64(len(config)), nil
	if err := c.r.PushBlob(ctx, c.dst.String(), cfgDesc, bytes.NewReader(config)); err != nil {
		return nil, err
	}
	m.Versioned = specs.Versioned{SchemaVersion: 2}
	m.MediaType = ocispec.MediaTypeImageManifest
	m.Config, m.Layers = cfgDesc, layers
	return marshal(m)
}

// fetchConfig reads the image config desc and checks its digest.
func (c *converter) fetchConfig(ctx context.Context, desc ocispec.Descriptor) ([]byte, error) {
	if desc.Size > maxConfigSize {
		return nil, fmt.Errorf("config %s: %d bytes, more than %d", desc.Digest, desc.Size, maxConfigSize)
	}
	b, err := c.r.Blob(ctx, c.src.String(), desc)
	if err != nil {
		return nil, err
	}
	s := b.Stream(ctx)
	defer s.Close()
	config, err := io.ReadAll(s)
	if err != nil {
		return nil, err
	}
	if got := desc.Digest.Algorithm().FromBytes(config); got != desc.Digest {
		return nil, fmt.Errorf("config %s: content has digest %s", desc.Digest, got)
	}
	return config, nil
}

// withDiffIDs returns the image config b with rootfs.diff_ids replaced, and
// every other field as it was.
func withDiffIDs(b []byte, diffIDs []digest.Digest) ([]byte, error) {
	var config map[string]json.RawMessage
	if err := json.Unmarshal(b, &config); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	var rootfs map[string]json.RawMessage
	if err := json.Unmarshal(config["rootfs"], &rootfs); err != nil || rootfs == nil {
		return nil, fmt.Errorf("no rootfs object")
	}
	var old []digest.Digest
	if err := json.Unmarshal(rootfs["diff_ids"], &old); err != nil {
		return nil, fmt.Errorf("decode rootfs.diff_ids: %w", err)
	}
	if len(old) != len(diffIDs) {
		return nil, fmt.Errorf("%d diff_ids for %d layers", len(old), len(diffIDs))
	}
	var err error
	if rootfs["diff_ids"], err = marshal(diffIDs); err != nil {
		return nil, err
	}
	if config["rootfs"], err = marshal(rootfs); err != nil {
		return nil, err
	}
	return marshal(config)
}

// marshal encodes v as compact JSON without escaping HTML characters, so
// that strings read as they were written.
func marshal(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("encode JSON: %w", err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// warnNotFound tells which prioritized paths no layer has: likely typos.
func (c *converter) warnNotFound() {
	var missing []string
	for _, p := range c.prioritized {
		if !c.found[p] {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		fmt.Fprintf(c.log, "warning: no layer has these prioritized paths: %s\n", strings.Join(missing, ", "))
	}
}

// platformPrefix returns "os/arch[/variant] " for progress lines, or "".
func platformPrefix(p *ocispec.Platform) string {
	if p == nil {
		return ""
	}
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s + " "
}

// platformSuffix returns " (os/arch[/variant])" for errors, or "".
func platformSuffix(p *ocispec.Platform) string {
	if s := platformPrefix(p); s != "" {
		return " (" + strings.TrimSpace(s) + ")"
	}
	return ""
}
