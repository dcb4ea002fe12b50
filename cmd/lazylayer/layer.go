package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/fs/lazy"
)

// formatAnnotations returns the layer annotations a conversion sets; a
// source layer's own values of them are dropped: they describe its old blob.
func formatAnnotations() []string {
	return []string{
		estargz.TOCJSONDigestAnnotation,
		estargz.StoreUncompressedSizeAnnotation,
		zstdchunked.ManifestChecksumAnnotation,
		zstdchunked.ManifestPositionAnnotation,
		lazy.ExactDigestAnnotation,
		lazy.ExactOffsetAnnotation,
	}
}

// convertedLayer is a layer blob built and pushed.
type convertedLayer struct {
	mediaType   string
	digest      digest.Digest
	size        int64
	diffID      digest.Digest     // of the new blob's uncompressed tar
	annotations map[string]string // the format's: TOC digest, uncompressed size, ...
}

// descriptor returns src, the source layer's descriptor, describing the
// converted blob instead: other fields and annotations are kept.
func (l convertedLayer) descriptor(src ocispec.Descriptor) ocispec.Descriptor {
	d := src
	d.MediaType, d.Digest, d.Size = l.mediaType, l.digest, l.size
	d.URLs, d.Data = nil, nil
	d.Annotations = maps.Clone(src.Annotations)
	for _, k := range formatAnnotations() {
		delete(d.Annotations, k)
	}
	if d.Annotations == nil {
		d.Annotations = make(map[string]string, len(l.annotations))
	}
	maps.Copy(d.Annotations, l.annotations)
	return d
}

// buildParts is how many parts estargz splits a layer's tar into, to
// compress them at once. Where the tar is split shows in the blob's bytes,
// so estargz's default, GOMAXPROCS, would make the digest depend on the
// machine converting. Eight keeps most machines' cores busy on a big layer;
// with fewer cores the parts take turns, for the same result.
const buildParts = 8

// zstdChunkedCompression is estargz's Compression for zstd:chunked.
type zstdChunkedCompression struct {
	*zstdchunked.Decompressor
	*zstdchunked.Compressor
}

// layer converts the layer src and pushes it, or returns what an earlier
// call did with the same blob. It logs a progress line starting with what.
func (c *converter) layer(ctx context.Context, src ocispec.Descriptor, what string) (convertedLayer, error) {
	if l, ok := c.layers[src.Digest]; ok {
		fmt.Fprintf(c.log, "%s %s converted already\n", what, shortDigest(src.Digest))
		return l, nil
	}
	if !convertible(src.MediaType) {
		return convertedLayer{}, fmt.Errorf("media type %q is not a tar layer this command converts", src.MediaType)
	}
	start := time.Now()
	dir, err := os.MkdirTemp("", "lazylayer-convert-")
	if err != nil {
		return convertedLayer{}, fmt.Errorf("staging directory: %w", err)
	}
	defer os.RemoveAll(dir)

	in, err := c.fetchLayer(ctx, src, dir)
	if err != nil {
		return convertedLayer{}, fmt.Errorf("fetch: %w", err)
	}
	defer in.Close()
	out, l, err := c.build(ctx, in, src.Size, dir)
	if err != nil {
		return convertedLayer{}, err
	}
	defer out.Close()
	_ = os.Remove(in.Name()) // room for the next layer while this one uploads
	desc := ocispec.Descriptor{MediaType: l.mediaType, Digest: l.digest, Size: l.size}
	if err := c.r.PushBlob(ctx, c.dst.String(), desc, out); err != nil {
		return convertedLayer{}, err
	}
	c.layers[src.Digest] = l
	fmt.Fprintf(c.log, "%s %s %s → %s %s (%.1f s)\n", what, shortDigest(src.Digest),
		humanSize(src.Size), humanSize(l.size), c.formatName(), time.Since(start).Seconds())
	return l, nil
}

// convertible reports whether mt is a layer media type whose blob is a tar,
// plain or compressed with gzip or zstd: what estargz.Build takes.
func convertible(mt string) bool {
	switch mt {
	case ocispec.MediaTypeImageLayer, ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd,
		images.MediaTypeDockerSchema2Layer, images.MediaTypeDockerSchema2LayerGzip, images.MediaTypeDockerSchema2LayerZstd:
		return true
	}
	return false
}

// fetchLayer streams the blob src into a file in dir and checks its digest.
// The file is returned at offset 0; the caller closes it.
func (c *converter) fetchLayer(ctx context.Context, src ocispec.Descriptor, dir string) (*os.File, error) {
	b, err := c.r.Blob(ctx, c.src.String(), src)
	if err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(dir, "source-")
	if err != nil {
		return nil, err
	}
	s := b.Stream(ctx)
	d := src.Digest.Algorithm().Digester()
	_, err = io.Copy(io.MultiWriter(f, d.Hash()), s)
	_ = s.Close()
	if err == nil && d.Digest() != src.Digest {
		err = fmt.Errorf("content has digest %s", d.Digest())
	}
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// build rebuilds the layer blob in (size bytes, any compression) in the
// target format, into a file in dir returned at offset 0, with its exact
// record (see exactTar).
func (c *converter) build(ctx context.Context, in *os.File, size int64, dir string) (*os.File, convertedLayer, error) {
	var missed []string
	opts := []estargz.Option{
		estargz.WithContext(ctx),
		estargz.WithAllowPrioritizeNotFound(&missed),
		estargz.WithParallelism(buildParts),
	}
	if len(c.prioritized) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(c.prioritized))
	}
	if c.chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(c.chunkSize))
	}
	var zstdMetadata map[string]string
	if c.zstdChunked {
		zstdMetadata = make(map[string]string)
		opts = append(opts, estargz.WithCompression(&zstdChunkedCompression{
			Decompressor: new(zstdchunked.Decompressor),
			Compressor:   &zstdchunked.Compressor{CompressionLevel: zstd.SpeedDefault, Metadata: zstdMetadata},
		}))
	}
	src, record, err := exactTar(in, size, dir)
	if err != nil {
		return nil, convertedLayer{}, err
	}
	blob, err := estargz.Build(src, opts...)
	if err != nil {
		return nil, convertedLayer{}, fmt.Errorf("build %s: %w", c.formatName(), err)
	}
	out, err := os.CreateTemp(dir, "converted-")
	if err != nil {
		_ = blob.Close()
		return nil, convertedLayer{}, err
	}
	d := digest.Canonical.Digester()
	n, err := io.Copy(io.MultiWriter(out, d.Hash()), blob)
	if cerr := blob.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err == nil {
		_, err = out.Seek(0, io.SeekStart)
	}
	if err != nil {
		out.Close()
		return nil, convertedLayer{}, fmt.Errorf("build %s: %w", c.formatName(), err)
	}
	usize, err := blob.UncompressedSize()
	if err != nil {
		out.Close()
		return nil, convertedLayer{}, fmt.Errorf("build %s: %w", c.formatName(), err)
	}
	c.noteFound(missed)

	l := convertedLayer{
		mediaType: ocispec.MediaTypeImageLayerGzip,
		digest:    d.Digest(),
		size:      n,
		diffID:    blob.DiffID(),
		annotations: map[string]string{
			estargz.TOCJSONDigestAnnotation:         blob.TOCDigest().String(),
			estargz.StoreUncompressedSizeAnnotation: strconv.FormatInt(usize, 10),
		},
	}
	off, err := c.exactOffset(out, n)
	if err != nil {
		out.Close()
		return nil, convertedLayer{}, fmt.Errorf("build %s: %w", c.formatName(), err)
	}
	maps.Copy(l.annotations, lazy.ExactAnnotations(record, off))
	if c.zstdChunked {
		l.mediaType = ocispec.MediaTypeImageLayerZstd
		for _, k := range []string{zstdchunked.ManifestChecksumAnnotation, zstdchunked.ManifestPositionAnnotation} {
			v, ok := zstdMetadata[k]
			if !ok {
				out.Close()
				return nil, convertedLayer{}, fmt.Errorf("build zstd:chunked: no %s from the compressor", k)
			}
			l.annotations[k] = v
		}
	}
	return out, l, nil
}

// noteFound records which prioritized paths a layer had: all but missed.
func (c *converter) noteFound(missed []string) {
	if c.found == nil {
		c.found = make(map[string]bool)
	}
	skip := make(map[string]bool, len(missed))
	for _, p := range missed {
		skip[p] = true
	}
	for _, p := range c.prioritized {
		if !skip[p] {
			c.found[p] = true
		}
	}
}

// formatName names the target format in messages.
func (c *converter) formatName() string {
	if c.zstdChunked {
		return "zstd:chunked"
	}
	return "eStargz"
}

// shortDigest returns "sha256:" and the first 12 hex digits, then "…".
func shortDigest(d digest.Digest) string {
	if enc := d.Encoded(); len(enc) > 12 {
		return d.Algorithm().String() + ":" + enc[:12] + "…"
	}
	return d.String()
}

// humanSize formats n bytes with decimal units: "812 B", "12.3 MB".
func humanSize(n int64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	f, i := float64(n)/unit, 0
	for f >= unit && i < 4 {
		f /= unit
		i++
	}
	return fmt.Sprintf("%.1f %cB", f, "kMGTP"[i])
}
