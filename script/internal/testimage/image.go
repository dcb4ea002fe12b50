package testimage

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Compression is how a layer's tar stream is compressed in its blob.
type Compression int

// The supported compressions. The zero value is Gzip.
const (
	Gzip Compression = iota
	Zstd
	None
)

// String returns "gzip", "zstd" or "none".
func (c Compression) String() string {
	switch c {
	case Gzip:
		return "gzip"
	case Zstd:
		return "zstd"
	case None:
		return "none"
	}
	return fmt.Sprintf("Compression(%d)", int(c))
}

// MediaType returns the OCI media type of a layer blob compressed with c.
func (c Compression) MediaType() string {
	switch c {
	case Zstd:
		return ocispec.MediaTypeImageLayerZstd
	case None:
		return ocispec.MediaTypeImageLayer
	}
	return ocispec.MediaTypeImageLayerGzip
}

// Layer is one image layer.
type Layer struct {
	// Entries are written to the layer's tar stream in this order.
	Entries []Entry
	// Compression of the layer blob.
	Compression Compression
	// Raw, if not nil, is the layer's tar stream, written verbatim instead of
	// Entries (compressed as Compression says). See RawLayer.
	Raw []byte
}

// RawLayer returns a layer whose tar stream is exactly tarBytes, for layers
// a tar writer would not produce: truncated or corrupt archives, or anything
// else an extractor must survive. Blob digest and diffID are computed from
// the bytes as given, so the registry serves them faithfully.
func RawLayer(tarBytes []byte, c Compression) Layer {
	return Layer{Raw: tarBytes, Compression: c}
}

// Image is an image to build: its layers bottom first, and the runtime
// configuration. The image is always linux/amd64.
type Image struct {
	Layers []Layer
	// Config holds Cmd, Entrypoint, Env, WorkingDir and so on.
	Config ocispec.ImageConfig
}

// builtLayer is a layer blob written to a temporary file.
type builtLayer struct {
	path   string
	desc   ocispec.Descriptor
	diffID digest.Digest
}

// buildLayer writes l's blob into a new temporary file in dir and returns it
// with its descriptor and diffID. The caller removes the file.
func buildLayer(ctx context.Context, dir string, l Layer) (builtLayer, error) {
	f, err := os.CreateTemp(dir, "layer-*")
	if err != nil {
		return builtLayer{}, fmt.Errorf("create layer file: %w", err)
	}
	b := builtLayer{path: f.Name()}
	err = writeLayer(ctx, f, l, &b)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close layer file: %w", cerr)
	}
	if err != nil {
		os.Remove(b.path)
		return builtLayer{}, err
	}
	return b, nil
}

func writeLayer(ctx context.Context, f *os.File, l Layer, b *builtLayer) error {
	buf := bufio.NewWriterSize(f, 1<<20)
	blobDigester := digest.Canonical.Digester()
	blob := &countWriter{w: io.MultiWriter(buf, blobDigester.Hash())}
	comp, err := compressor(blob, l.Compression)
	if err != nil {
		return err
	}
	diffDigester := digest.Canonical.Digester()
	tarOut := ctxWriter{ctx: ctx, w: io.MultiWriter(comp, diffDigester.Hash())}
	if l.Raw != nil {
		_, err = tarOut.Write(l.Raw)
	} else {
		err = WriteTar(tarOut, l.Entries)
	}
	if err != nil {
		return fmt.Errorf("write layer tar: %w", err)
	}
	if err := comp.Close(); err != nil {
		return fmt.Errorf("finish %s compression: %w", l.Compression, err)
	}
	if err := buf.Flush(); err != nil {
		return fmt.Errorf("write layer file: %w", err)
	}
	b.diffID = diffDigester.Digest()
	b.desc = ocispec.Descriptor{
		MediaType: l.Compression.MediaType(),
		Digest:    blobDigester.Digest(),
		Size:      blob.n,
	}
	return nil
}

// compressor returns a writer compressing into w; closing it ends the
// compressed stream but does not close w.
func compressor(w io.Writer, c Compression) (io.WriteCloser, error) {
	switch c {
	case Gzip:
		return gzip.NewWriter(w), nil
	case Zstd:
		// One encoder goroutine keeps the output identical run to run.
		zw, err := zstd.NewWriter(w, zstd.WithEncoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("zstd writer: %w", err)
		}
		return zw, nil
	case None:
		return nopWriteCloser{w}, nil
	}
	return nil, fmt.Errorf("unknown compression %d", int(c))
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// countWriter counts the bytes written through it in n.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// ctxWriter fails writes once ctx is done, so building a big layer stops
// soon after cancellation.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}

// imageConfig returns the JSON OCI image config for img with the given layer
// diffIDs.
func imageConfig(img Image, diffIDs []digest.Digest) ([]byte, error) {
	created := DefaultModTime()
	history := make([]ocispec.History, len(diffIDs))
	for i := range history {
		history[i] = ocispec.History{
			Created:   &created,
			CreatedBy: fmt.Sprintf("lazylayer testimage: layer %d (%s)", i, img.Layers[i].Compression),
		}
	}
	cfg := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config:   img.Config,
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
		History:  history,
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encode image config: %w", err)
	}
	return b, nil
}

// imageManifest returns the JSON OCI manifest referring to config and layers.
func imageManifest(config ocispec.Descriptor, layers []ocispec.Descriptor) ([]byte, error) {
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    config,
		Layers:    layers,
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	return b, nil
}
