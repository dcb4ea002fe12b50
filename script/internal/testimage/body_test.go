package testimage

import (
	"bytes"
	"io"
	"testing"
)

func readBody(t *testing.T, b Body) []byte {
	t.Helper()
	r, size, err := b.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(data)) != size {
		t.Fatalf("body gave %d bytes, Open said %d", len(data), size)
	}
	return data
}

func TestBodies(t *testing.T) {
	t.Run("random", func(t *testing.T) {
		a, b := readBody(t, Random(7, 100_000)), readBody(t, Random(7, 100_000))
		if !bytes.Equal(a, b) {
			t.Error("Random is not deterministic")
		}
		if bytes.Equal(a, readBody(t, Random(8, 100_000))) {
			t.Error("Random ignores its seed")
		}
		if bytes.Count(a, []byte{0}) > 1000 {
			t.Error("Random looks too regular")
		}
	})
	t.Run("text", func(t *testing.T) {
		a := readBody(t, Text(3, 12345))
		if !bytes.Equal(a, readBody(t, Text(3, 12345))) {
			t.Error("Text is not deterministic")
		}
		if bytes.Count(a, []byte("\n")) < 100 {
			t.Error("Text has too few lines")
		}
	})
	t.Run("sparse", func(t *testing.T) {
		got := readBody(t, Sparse(1<<20, map[int64][]byte{10: []byte("abc"), 1<<20 - 2: []byte("yz")}))
		want := make([]byte, 1<<20)
		copy(want[10:], "abc")
		copy(want[1<<20-2:], "yz")
		if !bytes.Equal(got, want) {
			t.Error("Sparse content wrong")
		}
		if _, _, err := Sparse(10, map[int64][]byte{8: []byte("abc")}).Open(); err == nil {
			t.Error("Sparse accepted a segment past its size")
		}
		if _, _, err := Sparse(10, map[int64][]byte{1: []byte("abc"), 2: []byte("x")}).Open(); err == nil {
			t.Error("Sparse accepted overlapping segments")
		}
	})
	t.Run("host file", func(t *testing.T) {
		if _, _, err := HostFile(t.TempDir()).Open(); err == nil {
			t.Error("HostFile accepted a directory")
		}
	})
}

func TestWriteTarRejectsContentOnNonRegular(t *testing.T) {
	err := WriteTar(io.Discard, []Entry{{Name: "d/", Type: TypeDir, Content: []byte("x")}})
	if err == nil {
		t.Error("WriteTar wrote content on a directory")
	}
}

func TestWhiteoutNames(t *testing.T) {
	if got := Whiteout("a/b/c").Name; got != "a/b/.wh.c" {
		t.Errorf("Whiteout = %q", got)
	}
	if got := Whiteout("top").Name; got != ".wh.top" {
		t.Errorf("Whiteout = %q", got)
	}
	if got := Opaque("a/b").Name; got != "a/b/.wh..wh..opq" {
		t.Errorf("Opaque = %q", got)
	}
}
