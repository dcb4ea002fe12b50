package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// These tests run the remote-snapshot protocol against fakeFS, a FileSystem
// whose lazy mount is a bind mount of a prepared directory, and check what
// containerd would observe: errors, mounts, labels, and the files an
// overlay of those mounts shows.

// layerFile is the one file every fake layer holds.
const layerFile = "hello"

// fakeBehavior is what fakeFS.Prepare does for one target.
type fakeBehavior struct {
	local bool          // fill dir/fs and return no LazyLayer
	err   error         // fail (after writing part of dir/fs)
	hold  chan struct{} // wait for it to close first (or for ctx)
	// after runs at the end of a Prepare that succeeds, before it returns.
	after func(dir string)
}

// fakeFS is a FileSystem that serves a layer "lazily" by bind-mounting a
// directory holding its tree at dir/lazy.
type fakeFS struct {
	t *testing.T

	mu         sync.Mutex
	sn         *Snapshotter                 // for Start's check; guarded by mu
	behavior   map[string]fakeBehavior      // by target name; guarded by mu
	restoreErr error                        // guarded by mu
	entered    chan string                  // gets the dir of every Prepare that starts, when set
	prepares   []string                     // dirs; guarded by mu
	parents    map[string][]string          // Prepare's parents by dir; guarded by mu
	restores   map[string]map[string]string // Restore's labels by dir; guarded by mu
	releases   []string                     // dirs; guarded by mu
	layers     map[string]*fakeLayer        // Prepare's and Restore's layers, by dir; guarded by mu
}

func newFakeFS(t *testing.T) *fakeFS {
	f := &fakeFS{
		t:        t,
		behavior: map[string]fakeBehavior{},
		parents:  map[string][]string{},
		restores: map[string]map[string]string{},
		layers:   map[string]*fakeLayer{},
	}
	// The owner of a FileSystem releases its mounts when the daemon stops.
	t.Cleanup(f.releaseAll)
	return f
}

func (f *fakeFS) set(target string, b fakeBehavior) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.behavior[target] = b
}

func (f *fakeFS) Prepare(ctx context.Context, dir string, parents []string, labels map[string]string) (LazyLayer, error) {
	target := labels[snapshots.LabelSnapshotRef]
	f.mu.Lock()
	b := f.behavior[target]
	f.prepares = append(f.prepares, dir)
	f.parents[dir] = parents
	entered := f.entered
	f.mu.Unlock()
	if entered != nil {
		entered <- dir
	}
	if b.hold != nil {
		select {
		case <-b.hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if b.err != nil {
		// A failed fetch may leave part of the tree behind.
		if err := os.WriteFile(filepath.Join(dir, "fs", "partial"), []byte("half"), 0o644); err != nil {
			return nil, err
		}
		return nil, b.err
	}
	if b.local {
		if err := writeLayerTree(filepath.Join(dir, "fs"), target); err != nil {
			return nil, err
		}
		if b.after != nil {
			b.after(dir)
		}
		return nil, nil
	}
	l, err := f.mountLazy(dir, target)
	if err != nil {
		return nil, err
	}
	if b.after != nil {
		b.after(dir)
	}
	return l, nil
}

func (f *fakeFS) Restore(ctx context.Context, dir string, labels map[string]string) (LazyLayer, error) {
	f.mu.Lock()
	f.restores[dir] = labels
	err := f.restoreErr
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return f.mountLazy(dir, labels[snapshots.LabelSnapshotRef])
}

func (f *fakeFS) Release(ctx context.Context, dir string) error {
	f.mu.Lock()
	f.releases = append(f.releases, dir)
	delete(f.layers, dir)
	f.mu.Unlock()
	return unmountLazy(dir)
}

// mountLazy bind-mounts a directory holding the tree of target at dir/lazy.
func (f *fakeFS) mountLazy(dir, target string) (*fakeLayer, error) {
	src, err := os.MkdirTemp(f.t.TempDir(), "lazy-")
	if err != nil {
		return nil, err
	}
	if err := writeLayerTree(src, target); err != nil {
		return nil, err
	}
	if err := unix.Mount(src, filepath.Join(dir, "lazy"), "", unix.MS_BIND, ""); err != nil {
		return nil, fmt.Errorf("bind mount: %w", err)
	}
	l := &fakeLayer{f: f, dir: dir, target: target}
	f.mu.Lock()
	f.layers[dir] = l
	f.mu.Unlock()
	return l, nil
}

func unmountLazy(dir string) error {
	err := unix.Unmount(filepath.Join(dir, "lazy"), unix.MNT_DETACH)
	if err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return err
	}
	return nil
}

// releaseAll detaches every mount the fake made, as the FileSystem's owner
// does when the daemon stops.
func (f *fakeFS) releaseAll() {
	f.mu.Lock()
	var dirs []string
	for dir := range f.layers {
		dirs = append(dirs, dir)
	}
	clear(f.layers)
	f.mu.Unlock()
	for _, dir := range dirs {
		if err := unmountLazy(dir); err != nil {
			f.t.Errorf("unmount %s: %v", dir, err)
		}
	}
}

// entered waits for a Prepare of f to start and returns its dir.
func entered(t *testing.T, f *fakeFS) string {
	t.Helper()
	select {
	case dir := <-f.entered:
		return dir
	case <-time.After(30 * time.Second):
		t.Fatal("the fake's Prepare was not called")
		return ""
	}
}

func (f *fakeFS) setSnapshotter(sn *Snapshotter) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sn = sn
}

func (f *fakeFS) layer(dir string) *fakeLayer {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.layers[dir]
}

func (f *fakeFS) calls() (prepares, releases []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.prepares), slices.Clone(f.releases)
}

// fakeLayer is a layer fakeFS serves lazily.
type fakeLayer struct {
	f           *fakeFS
	dir, target string

	mu     sync.Mutex
	starts int                         // guarded by mu
	local  func(context.Context) error // from Start; guarded by mu
	// uncommitted says why the layer's snapshot was not committed as
	// a lazy layer when Start ran; guarded by mu.
	uncommitted error
}

func (l *fakeLayer) Start(local func(context.Context) error) {
	l.f.mu.Lock()
	sn := l.f.sn
	l.f.mu.Unlock()
	var why error
	if sn != nil { // nil while New restores layers
		why = checkCommittedLazy(sn, l.target, filepath.Join(l.dir, "lazy"))
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.starts++
	l.local = local
	l.uncommitted = why
}

// waitStarted waits until Start was called on l, and checks it was once,
// on a committed snapshot.
func waitStarted(t *testing.T, l *fakeLayer) {
	t.Helper()
	if l == nil {
		t.Fatal("the fake serves no layer there")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, why := l.started()
		if n > 0 {
			if n != 1 || why != nil {
				t.Errorf("Start called %d times; when it ran: %v", n, why)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("Start was not called")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// checkCommittedLazy says what is wrong, if anything, with the snapshot
// target as a committed lazy layer served at lazyDir: its labels, and the
// mount a child of it gets.
func checkCommittedLazy(sn *Snapshotter, target, lazyDir string) error {
	ctx := context.Background()
	info, err := sn.Stat(ctx, target)
	if err != nil {
		return err
	}
	if info.Kind != snapshots.KindCommitted || info.Labels[LabelState] != string(StateLazy) {
		return fmt.Errorf("snapshot %q is %v with state %q", target, info.Kind, info.Labels[LabelState])
	}
	key := "start-check " + target
	mounts, err := sn.View(ctx, key, target)
	if err != nil {
		return err
	}
	defer sn.Remove(ctx, key)
	if len(mounts) != 1 || mounts[0].Source != lazyDir {
		return fmt.Errorf("a view of %q mounts %+v, want %s", target, mounts, lazyDir)
	}
	return nil
}

func (l *fakeLayer) started() (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.starts, l.uncommitted
}

// makeLocal does what a FileSystem does when population finishes: it
// fills dir/fs with the layer's tree and calls local.
func (l *fakeLayer) makeLocal(ctx context.Context) error {
	l.mu.Lock()
	local := l.local
	l.mu.Unlock()
	if local == nil {
		return errors.New("Start was not called")
	}
	if err := writeLayerTree(filepath.Join(l.dir, "fs"), l.target); err != nil {
		return err
	}
	return local(ctx)
}

// writeLayerTree writes the tree of the fake layer target into dir.
func writeLayerTree(dir, target string) error {
	return os.WriteFile(filepath.Join(dir, layerFile), []byte("layer "+target), 0o644)
}

// remoteLabels are the labels containerd's unpacker passes to Prepare for
// layer target of an image.
func remoteLabels(target string) map[string]string {
	return map[string]string{
		snapshots.LabelSnapshotRef:             target,
		snapshotters.TargetRefLabel:            "registry.test/img:1",
		snapshotters.TargetLayerDigestLabel:    digest.FromString("blob of " + target).String(),
		snapshotters.TargetManifestDigestLabel: digest.FromString("manifest").String(),
	}
}

// prepareRemote asks for layer target as containerd's unpacker does.
func prepareRemote(ctx context.Context, sn *Snapshotter, key, parent, target string) ([]mount.Mount, error) {
	return sn.Prepare(ctx, key, parent, snapshots.WithLabels(remoteLabels(target)))
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("bind and overlay mounts need root")
	}
}

// verifyNone checks, once the test and its cleanups are done, that no
// goroutine the test started is left.
func verifyNone(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// newRemoteSnapshotter opens a snapshotter at root with f; it is closed,
// and nothing may be left mounted under root, when the test ends.
func newRemoteSnapshotter(t *testing.T, root string, f *fakeFS) *Snapshotter {
	t.Helper()
	t.Cleanup(func() {
		if mps := mountsUnder(t, root); len(mps) > 0 {
			t.Errorf("left mounted: %v", mps)
		}
	})
	sn, err := New(context.Background(), root, WithFileSystem(f))
	if err != nil {
		t.Fatal(err)
	}
	f.setSnapshotter(sn)
	t.Cleanup(func() {
		if err := sn.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		f.releaseAll()
	})
	return sn
}

// mountsUnder lists the mountpoints at or below dir.
func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	var mps []string
	for _, m := range ms {
		mps = append(mps, m.Mountpoint)
	}
	return mps
}

// lowerdirs returns the lower directories of an overlay mount, or the
// source of a bind mount.
func lowerdirs(t *testing.T, mounts []mount.Mount) []string {
	t.Helper()
	if len(mounts) != 1 {
		t.Fatalf("%d mounts, want 1: %+v", len(mounts), mounts)
	}
	if mounts[0].Type == "bind" {
		return []string{mounts[0].Source}
	}
	for _, o := range mounts[0].Options {
		if l, ok := strings.CutPrefix(o, "lowerdir="); ok {
			return strings.Split(l, ":")
		}
	}
	t.Fatalf("no lowerdir in %+v", mounts[0])
	return nil
}

// readMounted mounts mounts as containerd would and returns the content of
// file in it ("" if there is no such file) and the names at its root.
func readMounted(t *testing.T, mounts []mount.Mount, file string) (string, []string) {
	t.Helper()
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatalf("mount %+v: %v", mounts, err)
	}
	defer func() {
		if err := mount.UnmountAll(target, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount: %v", err)
		}
	}()
	entries, err := os.ReadDir(target)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	b, err := os.ReadFile(filepath.Join(target, file))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return string(b), names
}

// layerDir returns the snapshot directory of the committed layer name.
func layerDir(t *testing.T, sn *Snapshotter, name string) string {
	t.Helper()
	var id string
	err := sn.ms.WithTransaction(context.Background(), false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, name)
		return err
	})
	if err != nil {
		t.Fatalf("snapshot %q: %v", name, err)
	}
	return sn.snapshotDir(id)
}

// waitInStack waits until n goroutines are inside fn (as runtime stacks
// name it, e.g. "(*Snapshotter).claimTarget"): the state a test needs
// when it checks that a call waits.
func waitInStack(t *testing.T, fn string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		buf := make([]byte, 4<<20)
		buf = buf[:runtime.Stack(buf, true)]
		got := 0
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, fn+"(") {
				got++
			}
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines in %s, want %d", got, fn, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRemotePrepareLazy: containerd's Prepare of a layer the FileSystem
// serves lazily gets AlreadyExists; the layer is committed as lazy before
// Start; children see the lazy mount until local is called, then dir/fs.
func TestRemotePrepareLazy(t *testing.T) {
	needRoot(t)
	verifyNone(t)
	ctx := context.Background()
	f := newFakeFS(t)
	sn := newRemoteSnapshotter(t, t.TempDir(), f)

	_, err := prepareRemote(ctx, sn, "extract-1 layer-1", "", "layer-1")
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare: %v, want AlreadyExists", err)
	}
	info, err := sn.Stat(ctx, "layer-1")
	if err != nil {
		t.Fatal(err)
	}
	if info.Kind != snapshots.KindCommitted || info.Labels[LabelState] != string(StateLazy) {
		t.Errorf("layer-1 is %v with state %q, want committed and lazy", info.Kind, info.Labels[LabelState])
	}
	if got, want := info.Labels[LabelLayerDigest], remoteLabels("layer-1")[snapshotters.TargetLayerDigestLabel]; got != want {
		t.Errorf("layer digest label %q, want %q", got, want)
	}
	if _, err := sn.Stat(ctx, "extract-1 layer-1"); !errdefs.IsNotFound(err) {
		t.Errorf("the active snapshot is left: %v", err)
	}
	dir := layerDir(t, sn, "layer-1")
	l := f.layer(dir)
	if l == nil {
		t.Fatal("the fake served nothing at the layer's directory")
	}
	if n, why := l.started(); n != 1 || why != nil {
		t.Errorf("Start called %d times; when it ran: %v", n, why)
	}

	// A layer above a lazy one gets the lazy mount as its parent.
	_, err = prepareRemote(ctx, sn, "extract-2 layer-2", "layer-1", "layer-2")
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of layer-2: %v, want AlreadyExists", err)
	}
	dir2 := layerDir(t, sn, "layer-2")
	f.mu.Lock()
	parents := f.parents[dir2]
	f.mu.Unlock()
	if want := []string{filepath.Join(dir, "lazy")}; !slices.Equal(parents, want) {
		t.Errorf("layer-2's parents %v, want %v", parents, want)
	}

	mounts, err := sn.Prepare(ctx, "container", "layer-1")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := lowerdirs(t, mounts), []string{filepath.Join(dir, "lazy")}; !slices.Equal(got, want) {
		t.Errorf("lowerdirs %v, want %v", got, want)
	}
	if got, _ := readMounted(t, mounts, layerFile); got != "layer layer-1" {
		t.Errorf("the container sees %s = %q", layerFile, got)
	}

	if err := l.makeLocal(ctx); err != nil {
		t.Fatalf("local: %v", err)
	}
	if info, err := sn.Stat(ctx, "layer-1"); err != nil || info.Labels[LabelState] != string(StateLocal) {
		t.Errorf("after local: state %q, %v", info.Labels[LabelState], err)
	}
	mounts, err = sn.Mounts(ctx, "container")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := lowerdirs(t, mounts), []string{filepath.Join(dir, "fs")}; !slices.Equal(got, want) {
		t.Errorf("after local: lowerdirs %v, want %v", got, want)
	}
	if got, _ := readMounted(t, mounts, layerFile); got != "layer layer-1" {
		t.Errorf("after local: the container sees %s = %q", layerFile, got)
	}
	// layer-2 is still lazy: a view of both shows its mount and layer-1's tree.
	mounts, err = sn.View(ctx, "view", "layer-2")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := lowerdirs(t, mounts), []string{filepath.Join(dir2, "lazy"), filepath.Join(dir, "fs")}; !slices.Equal(got, want) {
		t.Errorf("view of layer-2: lowerdirs %v, want %v", got, want)
	}
	layers, err := sn.Layers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]State{}
	for _, l := range layers {
		states[l.Name] = l.State
	}
	if want := map[string]State{"layer-1": StateLocal, "layer-2": StateLazy}; !mapsEqual(states, want) {
		t.Errorf("Layers: %v, want %v", states, want)
	}
}

func mapsEqual[K, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestRemotePrepareLocal: a layer the FileSystem fetched in full is
// committed local, and children use its tree.
func TestRemotePrepareLocal(t *testing.T) {
	needRoot(t)
	verifyNone(t)
	ctx := context.Background()
	f := newFakeFS(t)
	f.set("layer-1", fakeBehavior{local: true})
	sn := newRemoteSnapshotter(t, t.TempDir(), f)

	if _, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare: %v, want AlreadyExists", err)
	}
	info, err := sn.Stat(ctx, "layer-1")
	if err != nil || info.Kind != snapshots.KindCommitted || info.Labels[LabelState] != string(StateLocal) {
		t.Fatalf("layer-1: %v with state %q, %v", info.Kind, info.Labels[LabelState], err)
	}
	dir := layerDir(t, sn, "layer-1")
	mounts, err := sn.Prepare(ctx, "container", "layer-1")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := lowerdirs(t, mounts), []string{filepath.Join(dir, "fs")}; !slices.Equal(got, want) {
		t.Errorf("lowerdirs %v, want %v", got, want)
	}
	if got, _ := readMounted(t, mounts, layerFile); got != "layer layer-1" {
		t.Errorf("the container sees %s = %q", layerFile, got)
	}
}

// TestRemotePrepareDataLoss: bad data from the registry fails Prepare and
// leaves nothing: no snapshot, no directory, no mount.
func TestRemotePrepareDataLoss(t *testing.T) {
	needRoot(t)
	verifyNone(t)
	ctx := context.Background()
	root := t.TempDir()
	f := newFakeFS(t)
	f.set("layer-1", fakeBehavior{err: fmt.Errorf("layer blob has the wrong digest: %w", errdefs.ErrDataLoss)})
	sn := newRemoteSnapshotter(t, root, f)

	_, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1")
	if !errdefs.IsDataLoss(err) {
		t.Fatalf("Prepare: %v, want DataLoss", err)
	}
	for _, key := range []string{"extract-1", "layer-1"} {
		if _, err := sn.Stat(ctx, key); !errdefs.IsNotFound(err) {
			t.Errorf("Stat(%q): %v, want NotFound", key, err)
		}
	}
	if entries, _ := os.ReadDir(filepath.Join(root, "snapshots")); len(entries) != 0 {
		t.Errorf("snapshots/ keeps %d entries", len(entries))
	}
	if mps := mountsUnder(t, root); len(mps) > 0 {
		t.Errorf("left mounted: %v", mps)
	}
}

// TestRemotePrepareFallback: any other failure hands containerd an empty
// active snapshot to unpack the layer into itself.
func TestRemotePrepareFallback(t *testing.T) {
	needRoot(t)
	verifyNone(t)
	ctx := context.Background()
	f := newFakeFS(t)
	f.set("layer-1", fakeBehavior{local: true})
	f.set("layer-2", fakeBehavior{err: errors.New("registry unavailable")})
	sn := newRemoteSnapshotter(t, t.TempDir(), f)

	if _, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of layer-1: %v", err)
	}
	mounts, err := prepareRemote(ctx, sn, "extract-2", "layer-1", "layer-2")
	if err != nil {
		t.Fatalf("Prepare of layer-2: %v, want the active snapshot's mounts", err)
	}
	info, err := sn.Stat(ctx, "extract-2")
	if err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("extract-2: %v, %v; want an active snapshot", info.Kind, err)
	}
	if _, err := sn.Stat(ctx, "layer-2"); !errdefs.IsNotFound(err) {
		t.Errorf("Stat(layer-2): %v, want NotFound", err)
	}
	var upper string
	for _, o := range mounts[0].Options {
		if u, ok := strings.CutPrefix(o, "upperdir="); ok {
			upper = u
		}
	}
	if entries, err := os.ReadDir(upper); err != nil || len(entries) != 0 {
		t.Errorf("upperdir %q holds %d entries, %v; want it empty", upper, len(entries), err)
	}
	// containerd unpacks into the mounts: it sees layer-1 only.
	if _, names := readMounted(t, mounts, layerFile); !slices.Equal(names, []string{layerFile}) {
		t.Errorf("the fallback snapshot shows %v, want layer-1's %v", names, []string{layerFile})
	}
	if err := sn.Commit(ctx, "layer-2", "extract-2"); err != nil {
		t.Errorf("containerd's commit of the fallback: %v", err)
	}
}

// TestRemoteCommitFails: when the commit after a lazy Prepare fails, the
// lazy mount is released and nobody can be handed it.
func TestRemoteCommitFails(t *testing.T) {
	needRoot(t)
	t.Run("target committed meanwhile", func(t *testing.T) {
		verifyNone(t)
		ctx := context.Background()
		root := t.TempDir()
		f := newFakeFS(t)
		sn := newRemoteSnapshotter(t, root, f)
		var lazyDir string
		f.set("layer-1", fakeBehavior{after: func(dir string) {
			// Another pull, without the remote labels, unpacked and
			// committed the same layer while the fake mounted it.
			lazyDir = dir
			if _, err := sn.Prepare(ctx, "other", ""); err != nil {
				t.Error(err)
			}
			if err := sn.Commit(ctx, "layer-1", "other"); err != nil {
				t.Error(err)
			}
		}})
		if _, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1"); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("Prepare: %v, want AlreadyExists", err)
		}
		checkReleasedAfterFailedCommit(t, sn, f, lazyDir)
		info, err := sn.Stat(ctx, "layer-1")
		if err != nil || info.Labels[LabelState] != "" {
			t.Fatalf("layer-1: state %q, %v; want the other pull's snapshot", info.Labels[LabelState], err)
		}
		mounts, err := sn.Prepare(ctx, "container", "layer-1")
		if err != nil {
			t.Fatal(err)
		}
		if got, want := lowerdirs(t, mounts), []string{filepath.Join(layerDir(t, sn, "layer-1"), "fs")}; !slices.Equal(got, want) {
			t.Errorf("lowerdirs %v, want %v", got, want)
		}
	})
	t.Run("snapshot cannot be measured", func(t *testing.T) {
		verifyNone(t)
		ctx := context.Background()
		root := t.TempDir()
		f := newFakeFS(t)
		sn := newRemoteSnapshotter(t, root, f)
		var lazyDir string
		// A commit failure that is neither a cancellation nor a
		// duplicate: Commit cannot measure the snapshot's fs/.
		f.set("layer-1", fakeBehavior{after: func(dir string) {
			lazyDir = dir
			if err := os.Remove(filepath.Join(dir, "fs")); err != nil {
				t.Error(err)
			}
		}})
		if _, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1"); errdefs.IsAlreadyExists(err) {
			t.Fatalf("Prepare: %v, want it not to report the layer there", err)
		}
		checkReleasedAfterFailedCommit(t, sn, f, lazyDir)
		if _, err := sn.Stat(ctx, "layer-1"); !errdefs.IsNotFound(err) {
			t.Errorf("Stat(layer-1): %v, want NotFound", err)
		}
		if l := f.layer(lazyDir); l != nil {
			if n, _ := l.started(); n != 0 {
				t.Errorf("Start called %d times on a layer whose commit failed", n)
			}
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		verifyNone(t)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		root := t.TempDir()
		f := newFakeFS(t)
		sn := newRemoteSnapshotter(t, root, f)
		var lazyDir string
		// containerd gives up on the pull just as the layer is mounted:
		// the commit measures the snapshot under a done context.
		f.set("layer-1", fakeBehavior{after: func(dir string) {
			lazyDir = dir
			cancel()
		}})
		_, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1")
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Prepare: %v, want context.Canceled", err)
		}
		checkReleasedAfterFailedCommit(t, sn, f, lazyDir)
		bg := context.Background()
		for _, key := range []string{"extract-1", "layer-1"} {
			if _, err := sn.Stat(bg, key); !errdefs.IsNotFound(err) {
				t.Errorf("Stat(%q): %v, want NotFound", key, err)
			}
		}
		if _, err := sn.Prepare(bg, "container", "layer-1"); !errdefs.IsNotFound(err) {
			t.Errorf("Prepare on the failed layer: %v, want NotFound", err)
		}
		if entries, _ := os.ReadDir(filepath.Join(root, "snapshots")); len(entries) != 0 {
			t.Errorf("snapshots/ keeps %d entries", len(entries))
		}
	})
}

// checkReleasedAfterFailedCommit: the fake's mount in dir was released and
// never started, and nothing is mounted.
func checkReleasedAfterFailedCommit(t *testing.T, sn *Snapshotter, f *fakeFS, dir string) {
	t.Helper()
	if dir == "" {
		t.Fatal("the fake did not mount the layer")
	}
	if _, releases := f.calls(); !slices.Contains(releases, dir) {
		t.Errorf("Release(%s) was not called; releases: %v", dir, releases)
	}
	if mps := mountsUnder(t, sn.root); len(mps) > 0 {
		t.Errorf("left mounted: %v", mps)
	}
	sn.mu.Lock()
	n := len(sn.held)
	sn.mu.Unlock()
	if n != 0 {
		t.Errorf("the snapshotter still holds %d lazy layers", n)
	}
}

// TestRemoteConcurrentPrepare: two pulls of one layer obtain it once.
func TestRemoteConcurrentPrepare(t *testing.T) {
	needRoot(t)
	verifyNone(t)
	ctx := context.Background()
	f := newFakeFS(t)
	hold := make(chan struct{})
	f.set("layer-1", fakeBehavior{hold: hold})
	f.entered = make(chan string, 2)
	sn := newRemoteSnapshotter(t, t.TempDir(), f)

	errs := make(chan error, 2)
	go func() {
		_, err := prepareRemote(ctx, sn, "extract-a", "", "layer-1")
		errs <- err
	}()
	entered(t, f)
	go func() {
		_, err := prepareRemote(ctx, sn, "extract-b", "", "layer-1")
		errs <- err
	}()
	// The second waits for the first, which is in the fake's Prepare.
	waitInStack(t, "(*Snapshotter).claimTarget", 1)
	close(hold)
	for range 2 {
		var err error
		select {
		case err = <-errs:
		case <-time.After(30 * time.Second):
			t.Fatal("Prepare does not return")
		}
		if !errdefs.IsAlreadyExists(err) {
			t.Errorf("Prepare: %v, want AlreadyExists", err)
		}
	}
	if prepares, _ := f.calls(); len(prepares) != 1 {
		t.Errorf("the fake's Prepare ran %d times, want once", len(prepares))
	}
	for _, key := range []string{"extract-a", "extract-b"} {
		if _, err := sn.Stat(ctx, key); !errdefs.IsNotFound(err) {
			t.Errorf("Stat(%q): %v, want NotFound", key, err)
		}
	}
}

// TestRemoteRestore: after a restart, committed lazy layers are served
// again; one that cannot be is obtained again, and containers wait for it
// rather than get its empty directory.
func TestRemoteRestore(t *testing.T) {
	needRoot(t)
	// first runs a daemon that pulls layer-1 lazily and prepares a
	// container on it, then stops it, as a restart does.
	first := func(t *testing.T) (root, dir string) {
		ctx := context.Background()
		root = t.TempDir()
		f := newFakeFS(t)
		sn, err := New(ctx, root, WithFileSystem(f))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1"); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("Prepare: %v, want AlreadyExists", err)
		}
		if _, err := sn.Prepare(ctx, "container", "layer-1"); err != nil {
			t.Fatal(err)
		}
		dir = layerDir(t, sn, "layer-1")
		if err := sn.Close(); err != nil {
			t.Fatal(err)
		}
		f.releaseAll()
		return root, dir
	}

	t.Run("restored", func(t *testing.T) {
		verifyNone(t)
		ctx := context.Background()
		root, dir := first(t)
		f := newFakeFS(t)
		sn := newRemoteSnapshotter(t, root, f)
		f.mu.Lock()
		labels, restored := f.restores[dir]
		f.mu.Unlock()
		if !restored {
			t.Fatalf("Restore(%s) was not called", dir)
		}
		if labels[LabelState] != string(StateLazy) || labels[snapshots.LabelSnapshotRef] != "layer-1" {
			t.Errorf("Restore got labels %v", labels)
		}
		l := f.layer(dir)
		if n, _ := l.started(); n != 1 {
			t.Errorf("Start called %d times, want once", n)
		}
		mounts, err := sn.Mounts(ctx, "container")
		if err != nil {
			t.Fatal(err)
		}
		if got, want := lowerdirs(t, mounts), []string{filepath.Join(dir, "lazy")}; !slices.Equal(got, want) {
			t.Errorf("lowerdirs %v, want %v", got, want)
		}
		if got, _ := readMounted(t, mounts, layerFile); got != "layer layer-1" {
			t.Errorf("the container sees %s = %q", layerFile, got)
		}
		if err := l.makeLocal(ctx); err != nil {
			t.Errorf("local after restore: %v", err)
		}
	})

	for _, local := range []bool{true, false} {
		name := "obtained again lazy"
		if local {
			name = "obtained again local"
		}
		// No comma in a test name: t.TempDir paths end up in overlay options.
		t.Run(name, func(t *testing.T) {
			verifyNone(t)
			ctx := context.Background()
			root, dir := first(t)
			f := newFakeFS(t)
			f.restoreErr = errors.New("the TOC saved in the snapshot is gone")
			hold := make(chan struct{})
			f.set("layer-1", fakeBehavior{local: local, hold: hold})
			f.entered = make(chan string, 1)
			sn := newRemoteSnapshotter(t, root, f)

			if got := entered(t, f); got != dir {
				t.Fatalf("the layer is obtained again in %s, want %s", got, dir)
			}
			layers, err := sn.Layers(ctx)
			if err != nil || len(layers) != 1 || layers[0].Unavailable == "" {
				t.Errorf("Layers: %+v, %v; want layer-1 unavailable", layers, err)
			}
			tctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			_, err = sn.Mounts(tctx, "container")
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Mounts while the layer is obtained again: %v, want it to wait", err)
			}
			// containerd creates another container on the layer and
			// gives up waiting: the failed Prepare leaves no snapshot.
			tctx, cancel = context.WithTimeout(ctx, 50*time.Millisecond)
			_, err = sn.Prepare(tctx, "container-2", "layer-1")
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Prepare while the layer is obtained again: %v, want it to wait", err)
			}
			if _, err := sn.Stat(ctx, "container-2"); !errdefs.IsNotFound(err) {
				t.Errorf("a failed Prepare left its snapshot: %v", err)
			}

			type result struct {
				mounts []mount.Mount
				err    error
			}
			waiting := make(chan result, 1)
			go func() {
				mounts, err := sn.Mounts(ctx, "container")
				waiting <- result{mounts, err}
			}()
			waitInStack(t, "(*Snapshotter).lowers", 1)
			select {
			case r := <-waiting:
				t.Fatalf("Mounts returned while the layer is obtained again: %v, %v", r.mounts, r.err)
			default:
			}
			close(hold)
			var r result
			select {
			case r = <-waiting:
			case <-time.After(30 * time.Second):
				t.Fatal("Mounts still waits after the layer was obtained again")
			}
			if r.err != nil {
				t.Fatal(r.err)
			}
			want := filepath.Join(dir, "fs")
			state := StateLocal
			if !local {
				want = filepath.Join(dir, "lazy")
				state = StateLazy
				// Mounts may return before the recovery calls Start.
				waitStarted(t, f.layer(dir))
			}
			if got := lowerdirs(t, r.mounts); !slices.Equal(got, []string{want}) {
				t.Errorf("lowerdirs %v, want %v", got, []string{want})
			}
			if got, _ := readMounted(t, r.mounts, layerFile); got != "layer layer-1" {
				t.Errorf("the container sees %s = %q", layerFile, got)
			}
			layers, err = sn.Layers(ctx)
			if err != nil || len(layers) != 1 || layers[0].Unavailable != "" || layers[0].State != state {
				t.Errorf("Layers: %+v, %v; want layer-1 %s", layers, err, state)
			}
		})
	}

	t.Run("close while obtaining again", func(t *testing.T) {
		verifyNone(t)
		root, _ := first(t)
		f := newFakeFS(t)
		f.restoreErr = errors.New("the TOC saved in the snapshot is gone")
		f.set("layer-1", fakeBehavior{hold: make(chan struct{})}) // never released
		f.entered = make(chan string, 1)
		sn, err := New(context.Background(), root, WithFileSystem(f))
		if err != nil {
			t.Fatal(err)
		}
		entered(t, f)
		// Close stops the recovery; verifyNone checks that nothing of
		// it runs afterwards.
		if err := sn.Close(); err != nil {
			t.Fatal(err)
		}
	})
}

// TestRemoteRemoveReleases: removing a lazy layer releases its mount.
func TestRemoteRemoveReleases(t *testing.T) {
	needRoot(t)
	verifyNone(t)
	ctx := context.Background()
	root := t.TempDir()
	f := newFakeFS(t)
	sn := newRemoteSnapshotter(t, root, f)

	layers, err := sn.Layers(ctx)
	if err != nil || len(layers) != 0 {
		t.Fatalf("Layers on a fresh root: %v, %v; want none", layers, err)
	}
	if _, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare: %v, want AlreadyExists", err)
	}
	dir := layerDir(t, sn, "layer-1")
	if err := sn.Remove(ctx, "layer-1"); err != nil {
		t.Fatal(err)
	}
	if _, releases := f.calls(); !slices.Contains(releases, dir) {
		t.Errorf("releases %v, want %s among them", releases, dir)
	}
	if mps := mountsUnder(t, root); len(mps) > 0 {
		t.Errorf("left mounted: %v", mps)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the layer's directory is left: %v", err)
	}
	if layers, err := sn.Layers(ctx); err != nil || len(layers) != 0 {
		t.Errorf("Layers after Remove: %v, %v; want none", layers, err)
	}
}

// TestRemoteRestoreReleasesLocalLeftover: a mount left at a local layer's
// lazy/ by a daemon that died is released at start.
func TestRemoteRestoreReleasesLocalLeftover(t *testing.T) {
	needRoot(t)
	verifyNone(t)
	ctx := context.Background()
	root := t.TempDir()
	f := newFakeFS(t)
	f.set("layer-1", fakeBehavior{local: true})
	sn, err := New(ctx, root, WithFileSystem(f))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := prepareRemote(ctx, sn, "extract-1", "", "layer-1"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare: %v, want AlreadyExists", err)
	}
	dir := layerDir(t, sn, "layer-1")
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	// The daemon died after the layer turned local, before it detached
	// the layer's mount.
	if err := unix.Mount(t.TempDir(), filepath.Join(dir, "lazy"), "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unmountLazy(dir) })

	f2 := newFakeFS(t)
	newRemoteSnapshotter(t, root, f2)
	if _, releases := f2.calls(); !slices.Equal(releases, []string{dir}) {
		t.Errorf("releases at start %v, want %v", releases, []string{dir})
	}
	f2.mu.Lock()
	restores := len(f2.restores)
	f2.mu.Unlock()
	if restores != 0 {
		t.Errorf("Restore called %d times for a local layer", restores)
	}
	if mps := mountsUnder(t, root); len(mps) > 0 {
		t.Errorf("left mounted: %v", mps)
	}
}
