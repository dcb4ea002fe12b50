package layer

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/fs/meta"
)

// TestNativeTreeAfterPrepare: a lazy layer's Prepare returns once its TOC
// is verified and its data mount made; its metadata tree and the files
// containerd reads first come after, and mounts wait for them
// (WaitPresent). The test holds the read of etc/passwd, which the tree's
// completion waits for.
func TestNativeTreeAfterPrepare(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	// Incompressible, so that the file's bytes lie well before the TOC
	// and are read apart from it.
	content := make([]byte, 256<<10)
	rand.Read(content)
	desc := reg.addEstargz(t, "etc/passwd", string(content))
	m := newLifecycleManager(t, reg, Config{Policy: PolicyManual, Native: true, DataDir: t.TempDir()}, true)

	gate := make(chan struct{})
	reg.arm(gate, false)
	dir := snapshotDir(t)
	type result struct {
		ll  *Lazy
		err error
	}
	prepared := make(chan result, 1)
	go func() {
		ll, err := m.Prepare(context.Background(), dir, nil, labelsWith(desc))
		prepared <- result{ll, err}
	}()
	// Prepare's reads (footer and TOC, at the blob's end) go through; the
	// read of the file's bytes waits.
	var r *result
	held := false
	for r == nil || !held {
		select {
		case off := <-reg.waiting:
			if off < desc.Size/2 {
				held = true
				continue
			}
			gate <- struct{}{}
		case res := <-prepared:
			r = &res
		}
	}
	if r.err != nil || r.ll == nil {
		t.Fatalf("Prepare: lazy %v, %v", r.ll != nil, r.err)
	}
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if err := m.WaitPresent(done, dir); err == nil {
		t.Error("WaitPresent returned while the early files were still being fetched")
	}
	if p := m.Present(dir, true); p.Meta != "" || p.Lower != filepath.Join(dir, lazyMount, meta.RedirectRoot, layerID(dir)) {
		t.Errorf("before the tree is done the layer is presented as %+v, want its data mount's subtree alone", p)
	}
	if st := stat(m, dir); st.Native {
		t.Error("status says native before the tree is done")
	}

	close(gate)
	if err := m.WaitPresent(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	p := m.Present(dir, true)
	if p.Meta != filepath.Join(dir, metaDir) || len(p.Data) != 2 {
		t.Fatalf("once the tree is done the layer is presented as %+v", p)
	}
	redirect := make([]byte, 256)
	n, err := unix.Lgetxattr(filepath.Join(p.Meta, "etc/passwd"), "trusted.overlay.redirect", redirect)
	if want := redirectRoot(dir) + "/etc/passwd"; err != nil || string(redirect[:n]) != want {
		t.Errorf("etc/passwd in the tree redirects to %q (%v), want %q", redirect[:n], err, want)
	}
	if b, err := os.ReadFile(filepath.Join(m.placeDir(dir), "etc/passwd")); err != nil || string(b) != string(content) {
		t.Errorf("etc/passwd placed: %d bytes, %v; want the layer's %d", len(b), err, len(content))
	}
	if st := stat(m, dir); !st.Native {
		t.Error("status says not native once the tree is done")
	}
	if err := m.Release(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
}

// TestNativeTreeHoldsPopulation: a lazy layer's metadata tree, built
// after its Prepare returned, still counts as on-demand work (the end of
// the pull, which a container's start waits for): population yields to it
// until it is done. The test holds the tree by taking its building slot.
func TestNativeTreeHoldsPopulation(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	desc := reg.addEstargz(t, "etc/passwd", "root:x:0:0::/root:/bin/sh\n")
	activity := new(lazy.Activity)
	m := newLifecycleManager(t, reg, Config{
		Policy: PolicyManual, Native: true, DataDir: t.TempDir(), Lazy: lazy.Options{Activity: activity},
	}, true)
	if err := m.building.Acquire(context.Background(), treeEntriesAtOnce); err != nil { // the tree waits for its slot
		t.Fatal(err)
	}
	ll, dir := prepareLazy(t, m, desc)
	if activity.Busy() {
		// Not yet: the early files may still be fetched (a read).
		waitFor(t, "etc/passwd placed", func() bool {
			_, err := os.Stat(filepath.Join(m.placeDir(dir), "etc/passwd"))
			return err == nil
		})
	}
	if !activity.Busy() {
		t.Error("on-demand activity is not marked while the layer's tree waits to be built")
	}
	m.building.Release(treeEntriesAtOnce)
	if err := m.WaitPresent(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	if !ll.metaBuilt.Load() {
		t.Fatal("the tree was not built")
	}
	waitFor(t, "on-demand activity over once the tree is done", func() bool { return !activity.Busy() })
	if err := m.Release(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
}

// TestNativeReleaseWhileBuilding: a layer released while its tree is
// still being finished stops that work; nothing of it keeps running.
func TestNativeReleaseWhileBuilding(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	content := make([]byte, 256<<10)
	rand.Read(content)
	desc := reg.addEstargz(t, "etc/passwd", string(content))
	m := newLifecycleManager(t, reg, Config{Policy: PolicyManual, Native: true, DataDir: t.TempDir()}, true)

	gate := make(chan struct{})
	reg.arm(gate, false)
	dir := snapshotDir(t)
	prepared := make(chan error, 1)
	go func() {
		_, err := m.Prepare(context.Background(), dir, nil, labelsWith(desc))
		prepared <- err
	}()
	var perr error
	gotPrepared, held := false, false
	for !gotPrepared || !held {
		select {
		case off := <-reg.waiting:
			if off < desc.Size/2 {
				held = true
				continue
			}
			gate <- struct{}{}
		case perr = <-prepared:
			gotPrepared = true
		}
	}
	if perr != nil {
		t.Fatal(perr)
	}
	if err := m.Release(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	if err := m.WaitPresent(context.Background(), dir); err != nil {
		t.Errorf("WaitPresent of a released layer: %v", err)
	}
}

// TestNativeTreeRefused: a layer whose metadata tree cannot be built (it
// holds the reserved top-level .lazylayer) is shown through its data
// mount's subtree, which holds the whole layer, and says so for a daemon
// that takes its mount over.
func TestNativeTreeRefused(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	desc := reg.addEstargz(t, meta.RedirectRoot+"/x", "refused")
	m := newLifecycleManager(t, reg, Config{Policy: PolicyManual, Native: true, DataDir: t.TempDir()}, true)
	_, dir := prepareLazy(t, m, desc)
	if err := m.WaitPresent(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	p := m.Present(dir, true)
	if p.Meta != "" || len(p.Data) != 0 {
		t.Fatalf("a layer without a metadata tree is presented as %+v", p)
	}
	if b, err := os.ReadFile(filepath.Join(p.Lower, meta.RedirectRoot, "x")); err != nil || string(b) != "refused" {
		t.Errorf("through its lower directory the layer's file reads %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(dir, noMetaFile)); err != nil {
		t.Errorf("no record of the missing tree: %v", err)
	}
	if st := stat(m, dir); st.Native {
		t.Error("status says native without a metadata tree")
	}
	if _, err := os.Stat(filepath.Join(dir, metaDir)); err == nil {
		t.Error("a metadata tree was left")
	}
	if err := m.Release(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
}

// TestNativeSmallTreesTogether: a small layer's metadata tree is built
// while other trees take most, but not all, of the entries built at once.
func TestNativeSmallTreesTogether(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	desc := reg.addEstargz(t, "etc/passwd", "root:x:0:0::/root:/bin/sh\n")
	m := newLifecycleManager(t, reg, Config{Policy: PolicyManual, Native: true, DataDir: t.TempDir()}, true)
	const others = treeEntriesAtOnce - 100 // the layer has a handful of entries
	if err := m.building.Acquire(context.Background(), others); err != nil {
		t.Fatal(err)
	}
	defer m.building.Release(others)
	ll, dir := prepareLazy(t, m, desc)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.WaitPresent(ctx, dir); err != nil {
		t.Fatalf("the small tree waited for the others: %v", err)
	}
	if !ll.metaBuilt.Load() {
		t.Fatal("the tree was not built")
	}
	if err := m.Release(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
}
