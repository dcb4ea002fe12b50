package lazy

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazylayer/lazylayer/fs/extract"
)

func TestPopulateAndSwap(t *testing.T) {
	passthrough, why := PassthroughSupport(t.TempDir())
	if !passthrough {
		t.Logf("passthrough unavailable (%s): local reads go through the daemon", why)
	}
	f := newFixture(t, Options{Passthrough: passthrough})
	mnt := f.mnt

	// A read before population; its bytes are not fetched again.
	if b, err := os.ReadFile(filepath.Join(mnt, "data/small")); err != nil || !bytes.Equal(b, f.files["data/small"]) {
		t.Fatalf("read before population: %v", err)
	}
	// An open page-cache handle from before the swap.
	early, err := os.Open(filepath.Join(mnt, "etc/hostname"))
	if err != nil {
		t.Fatal(err)
	}
	defer early.Close()

	tree := filepath.Join(t.TempDir(), "fs")
	os.Mkdir(tree, 0o755)
	if err := f.layer.Populate(context.Background(), tree, PopulateOptions{RangeSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	size := int64(len(f.blob.data))
	if served := f.blob.served.Load(); served > size+size/100 {
		t.Errorf("the registry served %d bytes for a %d-byte blob: bytes were fetched twice", served, size)
	}
	for name, want := range f.files {
		if b, err := os.ReadFile(filepath.Join(tree, name)); err != nil || !bytes.Equal(b, want) {
			t.Errorf("local tree %s: %v", name, err)
		}
	}
	for _, name := range FormatNames() {
		if _, err := os.Lstat(filepath.Join(tree, name)); err == nil {
			t.Errorf("the local tree has eStargz's %s", name)
		}
	}

	f.layer.SetLocal(tree)
	before := f.layer.Stats().Reads
	b, err := os.ReadFile(filepath.Join(mnt, "data/big"))
	if err != nil || !bytes.Equal(b, f.files["data/big"]) {
		t.Fatalf("read after the swap: %v", err)
	}
	reads := f.layer.Stats().Reads - before
	if passthrough && reads != 0 {
		t.Errorf("with passthrough, reading a local file reached the daemon %d times", reads)
	}
	if !passthrough && reads == 0 {
		t.Error("without passthrough the daemon served no reads: where did the bytes come from?")
	}
	// The inode with a page-cache handle open stays in that mode: a new
	// open works and reads the right bytes, and so does the old handle.
	for _, fh := range []*os.File{early, mustOpen(t, filepath.Join(mnt, "etc/hostname"))} {
		buf := make([]byte, 64)
		n, err := fh.ReadAt(buf, 0)
		if string(buf[:n]) != "lazylayer\n" {
			t.Errorf("read through a handle of an inode opened before the swap: %q, %v", buf[:n], err)
		}
	}
}

func mustOpen(t *testing.T, path string) *os.File {
	fh, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fh.Close() })
	return fh
}

// TestPopulateExtractsWhileDownloading: population extracts the bytes it
// has while later ones are still on their way, as containerd's pull does;
// only the verified whole becomes the result.
func TestPopulateExtractsWhileDownloading(t *testing.T) {
	f := newFixture(t, Options{})
	hold := &blobHold{from: 2 << 20, release: make(chan struct{})}
	f.blob.hold.Store(hold)
	tree := t.TempDir()
	done := make(chan error, 1)
	go func() {
		done <- f.layer.Populate(context.Background(), tree, PopulateOptions{RangeSize: 256 << 10})
	}()
	// etc/hostname lies in the blob's first bytes, data/big runs past 2 MiB.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, err := os.ReadFile(filepath.Join(tree, "etc/hostname")); err == nil && bytes.Equal(b, f.files["etc/hostname"]) {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("Populate returned (%v) while the registry held back the blob's end", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("nothing was extracted while the blob's end was held back")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(hold.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(tree, "data/big"))
	if err != nil || !bytes.Equal(b, f.files["data/big"]) {
		t.Errorf("data/big after population: %v", err)
	}
}

// TestPopulateDownloadFailure: when the registry fails, Populate says so
// (not that the extraction was cut short) and keeps what it fetched.
func TestPopulateDownloadFailure(t *testing.T) {
	f := newFixture(t, Options{})
	f.blob.down.Store(true)
	err := f.layer.Populate(context.Background(), t.TempDir(), PopulateOptions{RangeSize: 256 << 10})
	if !errors.Is(err, errDown) {
		t.Fatalf("Populate with the registry down: %v, want %v", err, errDown)
	}
	if errors.Is(err, extract.ErrInvalid) {
		t.Errorf("a registry failure was reported as bad data: %v", err)
	}
	f.blob.down.Store(false)
	if err := f.layer.Populate(context.Background(), t.TempDir(), PopulateOptions{RangeSize: 256 << 10}); err != nil {
		t.Fatalf("Populate once the registry is back: %v", err)
	}
}

func TestPopulateRejectsBadBlob(t *testing.T) {
	data, desc, _ := buildLayer(t)
	// Every chunk matches its TOC digest, but the blob is not the one the
	// manifest names. (Set before Open: a mounted layer's prefetch reads
	// the descriptor.)
	desc.Digest = digest.FromString("another blob")
	l := openLayer(t, data, &testBlob{data: data}, desc, Options{})
	t.Cleanup(func() { l.Close() })
	tree := t.TempDir()
	err := l.Populate(context.Background(), tree, PopulateOptions{})
	if !errors.Is(err, extract.ErrInvalid) {
		t.Fatalf("Populate of a blob with the wrong digest: %v", err)
	}
	if held := l.Progress().Held; held != 0 {
		t.Errorf("after the failed check %d bytes are still held; the next attempt would trust them", held)
	}
}
