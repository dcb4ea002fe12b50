package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"

	"github.com/lazylayer/lazylayer/fs/lazy"
)

// TestExactTar: the tar handed to estargz holds the source's entries, then
// the exact record, last, listing what a TOC cannot say.
func TestExactTar(t *testing.T) {
	var src bytes.Buffer
	zw := gzip.NewWriter(&src)
	tw := tar.NewWriter(zw)
	entries := []struct {
		name string
		body string
		mt   time.Time
	}{
		{"a", "plain\n", time.Unix(1700000000, 0)},
		{"caf\xe9", "latin-1 name\n", time.Unix(1700000000, 0)},
		{"ns", "sub-second mtime\n", time.Unix(1700000000, 123456789)},
	}
	for _, e := range entries {
		tw.WriteHeader(&tar.Header{Name: e.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(e.body)), ModTime: e.mt, Format: tar.FormatPAX})
		tw.Write([]byte(e.body))
	}
	tw.Close()
	zw.Close()
	dir := t.TempDir()
	in, err := os.CreateTemp(dir, "src-")
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	in.Write(src.Bytes())
	sr, record, err := exactTar(in, int64(src.Len()), dir)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(sr)
	var names []string
	var last []byte
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, hdr.Name)
		last, _ = io.ReadAll(tr)
	}
	want := []string{"a", "caf\xe9", "ns", lazy.ExactName}
	if len(names) != len(want) {
		t.Fatalf("tar holds %q, want %q", names, want)
	}
	for i := range want {
		if names[i] != want[i] {
			t.Fatalf("tar holds %q, want %q", names, want)
		}
	}
	if !bytes.Equal(last, record) {
		t.Errorf("the last entry is not the record")
	}
	var rec struct {
		Entries []struct {
			T string `json:"t"`
			N []byte `json:"n"`
			M int64  `json:"m"`
		} `json:"entries"`
	}
	if err := json.Unmarshal(record, &rec); err != nil {
		t.Fatal(err)
	}
	if len(rec.Entries) != 2 || string(rec.Entries[0].N) != "caf\xe9" || rec.Entries[1].M != 1700000000123456789 {
		t.Errorf("record %s", record)
	}
}
