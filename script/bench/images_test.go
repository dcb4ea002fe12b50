package main

import (
	"testing"

	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

func TestLargestFile(t *testing.T) {
	img := testimage.Image{Layers: []testimage.Layer{
		{Entries: []testimage.Entry{
			testimage.Dir("a", 0o755),
			testimage.File("a/big", 0o644, "0123456789"),
			testimage.Dir("b", 0o755),
			testimage.File("b/bigger", 0o644, "0123456789abc"),
			testimage.File("c", 0o644, "01234567"),
		}},
		{Entries: []testimage.Entry{
			testimage.Whiteout("b"),
			testimage.BigFile("c", 0o644, testimage.Random(1, 11)),
			testimage.Hardlink("d", "c"),
		}},
	}}
	p, size, err := largestFile(img)
	if err != nil || p != "/c" || size != 11 {
		t.Errorf("largestFile = %q, %d, %v; want /c, 11", p, size, err)
	}
}

func TestSyntheticSamplesExist(t *testing.T) {
	names := map[string]bool{}
	for _, e := range synthetic().Layers[2].Entries {
		names["/"+e.Name] = true
	}
	for _, s := range syntheticSamples() {
		if !names[s] {
			t.Errorf("sample %s is not in the synthetic image", s)
		}
	}
}
