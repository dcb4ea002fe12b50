package lazy

import (
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// readerIndex indexes the gzip eStargz blob data as openTOC did before
// tocTree: through estargz's Reader, its TOC decoded as a stream.
func readerIndex(data []byte, desc ocispec.Descriptor) (*index, digest.Digest, error) {
	dec := new(estargz.GzipDecompressor)
	rec := &Recorded{src: bytes.NewReader(data)}
	exactOff, exactDigest, hasExact := exactOffset(desc)
	r, err := openStreamed(rec, desc.Size, dec)
	if err != nil {
		return nil, "", err
	}
	ix, err := indexTOC[*estargz.TOCEntry](readerSource{r}, desc, exactOff, exactDigest, hasExact, nil, dec, rec)
	return ix, r.TOCDigest(), err
}

// sameIndex checks that the index openTOC builds of data (from a tocTree)
// is the one estargz's Reader gives, or that both refuse the TOC.
func sameIndex(t *testing.T, data []byte, desc ocispec.Descriptor) {
	t.Helper()
	want, wantDigest, wantErr := readerIndex(data, desc)
	_, got, _, gotErr := openTOC(bytes.NewReader(data), desc, wantDigest)
	if (gotErr == nil) != (wantErr == nil) {
		t.Fatalf("tocTree: error %v; estargz's Reader: error %v", gotErr, wantErr)
	}
	if wantErr != nil {
		return
	}
	for _, f := range []struct {
		name      string
		got, want any
	}{
		{"entries", got.entries, want.entries}, {"children", got.children, want.children},
		{"names", got.names, want.names}, {"chunks", got.chunks, want.chunks},
		{"links", got.links, want.links}, {"rdevs", got.rdevs, want.rdevs}, {"xattrs", got.xattrs, want.xattrs},
		{"opaque", got.opaque, want.opaque}, {"byOffset", got.byOffset, want.byOffset},
		{"prefetchEnd", got.prefetchEnd, want.prefetchEnd}, {"view", got.view, want.view},
	} {
		if !reflect.DeepEqual(f.got, f.want) {
			t.Errorf("the index from tocTree has other %s than estargz's Reader's:\n got %v\nwant %v", f.name, f.got, f.want)
		}
	}
}

// blobOfTOC is an eStargz blob of 4 KiB of data and the TOC tocJSON, as
// FuzzOpen builds them; ok is false if tocJSON is not a TOC.
func blobOfTOC(tocJSON []byte) (data []byte, desc ocispec.Descriptor, tocDigest digest.Digest, ok bool) {
	var toc estargz.JTOC
	if json.Unmarshal(tocJSON, &toc) != nil {
		return nil, desc, "", false
	}
	var blob bytes.Buffer
	zw := gzip.NewWriter(&blob)
	zw.Write(bytes.Repeat([]byte{'x'}, 4096))
	zw.Close()
	tocDigest, err := estargz.NewGzipCompressor().WriteTOCAndFooter(&blob, int64(blob.Len()), &toc, nil)
	if err != nil {
		return nil, desc, "", false
	}
	data = blob.Bytes()
	desc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(len(data))}
	return data, desc, tocDigest, true
}

// TestTreeIndex: the index built from the TOC's entries as they are
// decoded is the one estargz's Reader gave, for built layers, a layer
// with an exact record, and every TOC of FuzzOpen's corpus.
func TestTreeIndex(t *testing.T) {
	t.Run("files", func(t *testing.T) {
		data, _ := manyFiles(t, 1000)
		sameIndex(t, data, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(len(data))})
	})
	t.Run("layer", func(t *testing.T) {
		data, desc, _ := buildLayer(t)
		sameIndex(t, data, desc)
	})
	t.Run("exact", func(t *testing.T) {
		data, desc := exactBlob(t, exactEntries(), nil)
		sameIndex(t, data, desc)
		_, ix, _, err := openTOC(bytes.NewReader(data), desc, "")
		if err == nil || ix != nil {
			t.Errorf("a TOC not of the manifest's digest was indexed")
		}
	})
	t.Run("hard links", func(t *testing.T) {
		// Each hard link's header sets the shared inode's attributes
		// again (the last wins), also through a link to a link.
		d := digest.FromString("abc")
		toc := fmt.Sprintf(`{"version":1,"entries":[
			{"name":"d/","type":"dir","mode":493,"modtime":"2020-01-01T00:00:00Z"},
			{"name":"d/a","type":"reg","size":3,"offset":10,"mode":420,"uid":1,"gid":1,"modtime":"2020-01-01T00:00:00Z","digest":%[1]q,"chunkDigest":%[1]q},
			{"name":"d/b","type":"hardlink","linkName":"d/a","mode":384,"uid":2,"gid":3,"modtime":"2021-01-01T00:00:00Z","xattrs":{"user.x":"eQ=="}},
			{"name":"d/z","type":"hardlink","linkName":"d/b","mode":448,"uid":4,"gid":5,"modtime":"2022-01-01T00:00:00Z"}]}`, d)
		// As blobOfTOC, with data that does not compress: the TOC is
		// then streamed into a tocTree.
		var jtoc estargz.JTOC
		if err := json.Unmarshal([]byte(toc), &jtoc); err != nil {
			t.Fatal(err)
		}
		var blob bytes.Buffer
		zw := gzip.NewWriter(&blob)
		noise := make([]byte, 4096)
		rand.Read(noise)
		zw.Write(noise)
		zw.Close()
		tocDigest, err := estargz.NewGzipCompressor().WriteTOCAndFooter(&blob, int64(blob.Len()), &jtoc, nil)
		if err != nil {
			t.Fatal(err)
		}
		data := blob.Bytes()
		desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(len(data))}
		if _, _, err := openTree(bytes.NewReader(data), desc.Size, new(estargz.GzipDecompressor)); err != nil {
			t.Fatalf("the TOC is not streamed into a tree: %v", err)
		}
		sameIndex(t, data, desc)
		_, ix, _, err := openTOC(bytes.NewReader(data), desc, tocDigest)
		if err != nil {
			t.Fatal(err)
		}
		num, ok := ix.lookupPath("d/a")
		if e := &ix.entries[num]; !ok || e.mode&0o7777 != 0o700 || e.uid != 4 || e.gid != 5 || string(ix.xattrs[num]["user.x"]) != "y" {
			t.Errorf("d/a: found %v, mode %o, owner %d:%d, xattrs %q; want the last link's 700, 4:5 and the xattr of the first", ok, e.mode&0o7777, e.uid, e.gid, ix.xattrs[num])
		}
	})
	files, err := filepath.Glob("testdata/fuzz/FuzzOpen/*")
	if err != nil || len(files) == 0 {
		t.Fatalf("FuzzOpen corpus: %v (%d files)", err, len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			_, arg, _ := strings.Cut(string(b), "\n")
			arg = strings.TrimSpace(arg)
			q, ok := strings.CutPrefix(arg, "[]byte(")
			if !ok {
				t.Fatalf("corpus entry %q", arg)
			}
			s, err := strconv.Unquote(strings.TrimSuffix(q, ")"))
			if err != nil {
				t.Fatal(err)
			}
			data, desc, _, ok := blobOfTOC([]byte(s))
			if !ok {
				t.Skip("not a TOC")
			}
			sameIndex(t, data, desc)
		})
	}
}

// TestClean: clean gives what cleaning the name below "/" gives, also when
// it returns the name as it is.
func TestClean(t *testing.T) {
	for _, name := range []string{"", ".", "..", "/", "a", "a/b", "/a", "a/", "./a", "../a", "a/../..", "..a", "a/..b",
		"a//b", "a/./b", "...", "../", "/../a", "a/b/..", ".wh..wh..opq", "usr/lib/d00001/module-000100.py"} {
		want := strings.TrimPrefix(path.Clean("/"+name), "/")
		if got := clean(name); got != want {
			t.Errorf("clean(%q) = %q, want %q", name, got, want)
		}
	}
}
