package layer

import (
	"context"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// smallDisk mounts a tmpfs of size bytes under a temporary directory and
// unmounts it when the test ends.
func smallDisk(t *testing.T, size int) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+strconv.Itoa(size)); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// randomContent is n bytes gzip cannot shrink.
func randomContent(seed int64, n int) string {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return string(b)
}

// TestFullDiskDropsStaging: when the disk fills up while layers are fetched
// ahead, the layer containerd asks for fails with a plain error (containerd
// then pulls it itself, not a data-loss refusal), the layers waiting in
// staging are deleted, and no blob is fetched again and again.
func TestFullDiskDropsStaging(t *testing.T) {
	disk := smallDisk(t, 3<<20)
	var layers [][]byte
	for i := range 4 {
		layers = append(layers, gzipLayer(t, "f", randomContent(int64(i), 1<<20)))
	}
	f := newFake(t, layers...)
	m, err := New(context.Background(), f, Config{Staging: filepath.Join(disk, "staging"), ConcurrentLayers: 3})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	snap := func(i int) string {
		dir := filepath.Join(disk, "snap"+strconv.Itoa(i))
		os.MkdirAll(filepath.Join(dir, "fs"), 0o755)
		return dir
	}
	var failed int
	for i := range layers {
		_, err := m.Prepare(context.Background(), snap(i), nil, labelsFor(f, i))
		if err == nil {
			continue
		}
		failed++
		if !errors.Is(err, syscall.ENOSPC) {
			t.Errorf("layer %d: %v; want an error that says the disk is full", i, err)
		}
		if errdefs.IsDataLoss(err) {
			t.Errorf("layer %d: a full disk is reported as bad data: %v", i, err)
		}
		if st := m.Staging(); st.Layers != 0 || st.Bytes != 0 {
			t.Errorf("after layer %d failed for a full disk, staging holds %+v", i, st)
		}
		waitStaging(t, m)
	}
	if failed == 0 {
		t.Fatal("4 MiB of layers fit on a 3 MiB disk: the test proves nothing")
	}
	for d, n := range f.opens {
		if n > 2 {
			t.Errorf("blob %s was fetched %d times", d, n)
		}
	}
}

// waitStaging waits until the staging directory is empty: fetches dropped
// while running delete their trees when they stop.
func waitStaging(t *testing.T, m *Manager) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		entries, _ := os.ReadDir(m.cfg.Staging)
		if len(entries) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("staging keeps %d trees after the disk filled up", len(entries))
		}
	}
}
