package lazy

import (
	"bytes"
	"context"
	"testing"

	"github.com/lazylayer/lazylayer/cache"
)

// FuzzOpen feeds arbitrary tables of contents to Open (footer and TOC
// parsing, TOC verification, index building): it must return an error or a
// consistent index (the one estargz's Reader gives), never panic or
// loop. The corpus in testdata/fuzz/FuzzOpen holds TOCs with hard-link cycles, directory hard
// links, odd names and chunk tables that do not add up.
func FuzzOpen(f *testing.F) {
	f.Add([]byte(`{"version":1,"entries":[{"name":"etc/","type":"dir","mode":493},{"name":"etc/hostname","type":"reg","size":3,"offset":10,"chunkDigest":"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}]}`))
	c, err := cache.Open(context.Background(), f.TempDir(), 0)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, tocJSON []byte) {
		data, desc, tocDigest, ok := blobOfTOC(tocJSON)
		if !ok {
			return
		}
		// The index is the one estargz's Reader gives, or both refuse.
		sameIndex(t, data, desc)
		l, err := Open(context.Background(), bytes.NewReader(data), nil, desc, tocDigest, Options{Cache: c})
		if err != nil {
			return
		}
		ix := l.ix
		for i := range ix.entries {
			e := &ix.entries[i]
			switch e.mode & 0o170000 {
			case 0o040000:
				if int(e.first+e.count) > len(ix.children) {
					t.Fatalf("entry %d: children %d+%d past %d", i, e.first, e.count, len(ix.children))
				}
				for _, k := range ix.dirChildren(e) {
					if int(k) >= len(ix.entries) {
						t.Fatalf("entry %d: child %d past %d entries", i, k, len(ix.entries))
					}
				}
			case 0o100000:
				if int(e.first+e.count) > len(ix.chunks) {
					t.Fatalf("entry %d: chunks %d+%d past %d", i, e.first, e.count, len(ix.chunks))
				}
			}
		}
	})
}
