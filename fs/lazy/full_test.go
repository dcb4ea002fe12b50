package lazy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/cache"
)

// tmpfs mounts a tmpfs of size bytes on a temporary directory until the
// test ends.
func tmpfs(t *testing.T, size int64) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d", size)); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// fill writes a file in dir until its filesystem is full.
func fill(t *testing.T, dir string) {
	t.Helper()
	f, err := os.CreateTemp(dir, "filler-")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return
		}
	}
}

// warnings returns the warnings and errors logged, with their errors.
func warnings(logs *test.Hook) []string {
	var out []string
	for _, e := range logs.AllEntries() {
		if e.Level <= logrus.WarnLevel {
			out = append(out, fmt.Sprintf("%s: %v", e.Message, e.Data[logrus.ErrorKey]))
		}
	}
	return out
}

// TestFullDisk: on a full disk, where neither the chunk cache nor the blob
// copy can be written, reads are served from what was fetched, each byte is
// fetched once, the log says so once for the cache and once for the layer,
// and population does not fetch what it cannot keep.
func TestFullDisk(t *testing.T) {
	dir := tmpfs(t, 1<<20)
	c, err := cache.Open(context.Background(), filepath.Join(dir, "cache"), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	data, desc, files := buildLayer(t)
	reg := newTestRegistry(t, data)
	l := openLayer(t, data, remoteBlob(t, reg.host, desc), desc, Options{Cache: c, BlobPath: filepath.Join(dir, "blob")})
	t.Cleanup(func() { l.Close() })
	fill(t, dir)
	logger, logs := test.NewNullLogger()
	ctx := log.WithLogger(context.Background(), logrus.NewEntry(logger))

	// The kernel reads 128 KiB at a time; the chunks are 256 KiB.
	want := files["data/big"]
	buf := make([]byte, 128<<10)
	for range 3 {
		for off := 0; off < len(want); off += len(buf) {
			n, err := readFile(ctx, l, "data/big", buf, int64(off))
			if err != nil || !bytes.Equal(buf[:n], want[off:min(off+len(buf), len(want))]) {
				t.Fatalf("read at %d on a full disk: %d bytes, %v", off, n, err)
			}
		}
	}
	served := reg.served.Load()
	t.Logf("the registry served %d bytes in %d requests for a %d-byte blob", served, reg.requests.Load(), desc.Size)
	if served > desc.Size {
		t.Errorf("the registry served %d bytes for a %d-byte blob: bytes were fetched again", served, desc.Size)
	}
	w := warnings(logs)
	if len(w) > 2 {
		t.Errorf("%d warnings, want one for the cache and one for the layer: %q", len(w), w)
	}
	for _, s := range w {
		if !strings.Contains(s, "no space left on device") {
			t.Errorf("warning %q does not say the disk is full", s)
		}
	}

	err = l.Populate(ctx, t.TempDir(), PopulateOptions{})
	if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("population on a full disk: %v, want ENOSPC", err)
	}
	if more := reg.served.Load() - served; more > 0 {
		t.Errorf("population fetched %d bytes it could not keep", more)
	}

	// A layer opened on the full disk serves reads too.
	l2 := openLayer(t, data, remoteBlob(t, reg.host, desc), desc, Options{Cache: c, BlobPath: filepath.Join(dir, "blob2")})
	t.Cleanup(func() { l2.Close() })
	b := make([]byte, 64)
	if n, err := readFile(ctx, l2, "etc/hostname", b, 0); err != nil || string(b[:n]) != "lazylayer\n" {
		t.Errorf("read from a layer opened on the full disk: %q, %v", b[:n], err)
	}
}
