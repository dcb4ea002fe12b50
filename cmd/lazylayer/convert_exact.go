package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"

	"github.com/lazylayer/lazylayer/fs/lazy"
)

// exactTar decompresses the source layer in (size bytes) into a file in
// dir and returns the tar that Build is to convert: the source's entries,
// byte for byte, then the exact record (lazy.ExactName) of what a TOC
// cannot say of them, last so that it lands right before the TOC.
func exactTar(in *os.File, size int64, dir string) (*io.SectionReader, []byte, error) {
	ds, err := compression.DecompressStream(io.NewSectionReader(in, 0, size))
	if err != nil {
		return nil, nil, fmt.Errorf("decompress: %w", err)
	}
	defer ds.Close()
	f, err := os.CreateTemp(dir, "tar-")
	if err != nil {
		return nil, nil, err
	}
	// The file is removed with dir; Build reads it through the section.
	n, err := io.Copy(f, ds)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("decompress: %w", err)
	}
	end, record, err := recordTar(io.NewSectionReader(f, 0, n))
	if err != nil {
		return nil, nil, fmt.Errorf("exact record: %w", err)
	}
	var tail bytes.Buffer
	tw := tar.NewWriter(&tail)
	hdr := &tar.Header{
		Typeflag: tar.TypeReg, Name: lazy.ExactName, Mode: 0o444, Size: int64(len(record)),
		ModTime: time.Unix(0, 0), Format: tar.FormatPAX,
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, nil, err
	}
	if _, err := tw.Write(record); err != nil {
		return nil, nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, nil, err
	}
	if err := f.Truncate(end); err != nil {
		return nil, nil, err
	}
	if _, err := f.WriteAt(tail.Bytes(), end); err != nil {
		return nil, nil, err
	}
	return io.NewSectionReader(f, 0, end+int64(tail.Len())), record, nil
}

// recordTar reads the tar r and returns where its last entry ends (its
// end-of-archive marker starts) and its exact record.
func recordTar(r io.Reader) (int64, []byte, error) {
	cr := &countReader{r: r}
	tr := tar.NewReader(cr)
	var x lazy.ExactRecorder
	for {
		pos := cr.n
		hdr, err := tr.Next()
		if err == io.EOF {
			rec, err := x.Record()
			return (pos + 511) &^ 511, rec, err
		}
		if err != nil {
			return 0, nil, err
		}
		x.Add(hdr)
		if _, err := io.Copy(io.Discard, tr); err != nil {
			return 0, nil, err
		}
	}
}

// countReader counts the bytes read through it.
type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// exactOffset returns where the record's compressed bytes start in the
// built blob (size bytes), read back from its TOC.
func (c *converter) exactOffset(blob io.ReaderAt, size int64) (int64, error) {
	var opts []estargz.OpenOption
	if c.zstdChunked {
		opts = append(opts, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	}
	r, err := estargz.Open(io.NewSectionReader(blob, 0, size), opts...)
	if err != nil {
		return 0, fmt.Errorf("read back the TOC: %w", err)
	}
	e, ok := r.Lookup(lazy.ExactName)
	if !ok || e.Offset <= 0 {
		return 0, fmt.Errorf("the built layer has no %s", lazy.ExactName)
	}
	return e.Offset, nil
}
