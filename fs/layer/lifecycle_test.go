package layer

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/cache"
	"github.com/lazylayer/lazylayer/fs/extract"
	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/fs/lazy"
)

// These tests drive a layer through its lifecycle (mount, population,
// local, retire, release) and the full-fetch scheduler, against
// gatedRegistry: the fakeRegistry of manager_test.go with calls a test can
// hold, count and corrupt.

// gatedRegistry wraps fakeRegistry. Once armed, its blobs' ReadRange calls
// are recorded, wait for gate when it is set and serve a wrong byte when
// corrupt is set; Opens of the blobs in openGate wait for their channel.
// Every wait also ends with the caller's context.
type gatedRegistry struct {
	*fakeRegistry

	mu       sync.Mutex
	armed    bool                            // guarded by mu
	offsets  []int64                         // armed ReadRange offsets; guarded by mu
	gate     chan struct{}                   // guarded by mu
	corrupt  bool                            // guarded by mu
	openGate map[digest.Digest]chan struct{} // guarded by mu
	// unwind, when set, holds a wait that its context ended until it is
	// closed: a registry call slow to notice; guarded by mu.
	unwind chan struct{}

	waiting   chan int64         // gets the offset of ReadRanges that wait for gate
	opening   chan digest.Digest // gets the digest of Opens that wait in openGate
	cancelled chan struct{}      // gets a value when a wait's context ends
}

// corruptAt is the byte an armed, corrupt ReadRange serves wrong: the
// MTIME of the blob's first gzip header, which only the blob digest
// notices.
const corruptAt = 4

func newGatedRegistry() *gatedRegistry {
	return &gatedRegistry{
		fakeRegistry: &fakeRegistry{blobs: map[digest.Digest][]byte{}, opens: map[digest.Digest]int{}},
		openGate:     map[digest.Digest]chan struct{}{},
		waiting:      make(chan int64, 16),
		opening:      make(chan digest.Digest, 16),
		cancelled:    make(chan struct{}, 16),
	}
}

// addEstargz adds a one-file eStargz layer to the image.
func (g *gatedRegistry) addEstargz(t *testing.T, name, content string) ocispec.Descriptor {
	b, desc := estargzLayer(t, name, content)
	g.blobs[desc.Digest] = b
	g.manifest.Layers = append(g.manifest.Layers, desc)
	return desc
}

// addGzip adds a one-file gzip layer to the image.
func (g *gatedRegistry) addGzip(t *testing.T, name, content string) ocispec.Descriptor {
	b := gzipLayer(t, name, content)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(b), Size: int64(len(b))}
	g.blobs[desc.Digest] = b
	g.manifest.Layers = append(g.manifest.Layers, desc)
	return desc
}

// arm starts recording (and holding or corrupting) ReadRange calls.
func (g *gatedRegistry) arm(gate chan struct{}, corrupt bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.armed, g.gate, g.corrupt = true, gate, corrupt
}

func (g *gatedRegistry) ranges() []int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.offsets)
}

// holdUnwind makes waits whose context ended hold until the returned
// function is called (at the latest when the test ends).
func (g *gatedRegistry) holdUnwind(t *testing.T) func() {
	ch := make(chan struct{})
	g.mu.Lock()
	g.unwind = ch
	g.mu.Unlock()
	var once sync.Once
	release := func() { once.Do(func() { close(ch) }) }
	t.Cleanup(release)
	return release
}

// wait waits for gate, or for ctx and then unwind.
func (g *gatedRegistry) wait(ctx context.Context, gate chan struct{}) error {
	select {
	case <-gate:
		return nil
	case <-ctx.Done():
	}
	g.mu.Lock()
	unwind := g.unwind
	g.mu.Unlock()
	g.cancelled <- struct{}{}
	if unwind != nil {
		<-unwind
	}
	return ctx.Err()
}

func (g *gatedRegistry) holdOpen(d digest.Digest) chan struct{} {
	ch := make(chan struct{})
	g.mu.Lock()
	defer g.mu.Unlock()
	g.openGate[d] = ch
	return ch
}

func (g *gatedRegistry) Open(ctx context.Context, ref string, desc ocispec.Descriptor) (io.ReadCloser, error) {
	g.mu.Lock()
	gate := g.openGate[desc.Digest]
	g.mu.Unlock()
	if gate != nil {
		select {
		case g.opening <- desc.Digest:
		default:
		}
		if err := g.wait(ctx, gate); err != nil {
			return nil, err
		}
	}
	return g.fakeRegistry.Open(ctx, ref, desc)
}

func (g *gatedRegistry) Ranges(ctx context.Context, ref string, desc ocispec.Descriptor) (lazy.Blob, error) {
	b, err := g.fakeRegistry.Ranges(ctx, ref, desc)
	if err != nil {
		return nil, err
	}
	return gatedBlob{g: g, b: b}, nil
}

type gatedBlob struct {
	g *gatedRegistry
	b lazy.Blob
}

func (b gatedBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	g := b.g
	g.mu.Lock()
	armed, gate, corrupt := g.armed, g.gate, g.corrupt
	if armed {
		g.offsets = append(g.offsets, off)
	}
	g.mu.Unlock()
	if armed && gate != nil {
		select {
		case g.waiting <- off:
		default:
		}
		if err := g.wait(ctx, gate); err != nil {
			return nil, err
		}
	}
	rc, err := b.b.ReadRange(ctx, off, n)
	if err != nil || !armed || !corrupt || off > corruptAt || off+n <= corruptAt {
		return rc, err
	}
	buf, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return nil, err
	}
	buf[corruptAt-off] ^= 0xff
	return io.NopCloser(bytes.NewReader(buf)), nil
}

// labelsWith are the labels containerd passes to Prepare for layer, with
// ahead as the image's layers above it.
func labelsWith(layer ocispec.Descriptor, ahead ...ocispec.Descriptor) map[string]string {
	all := []string{layer.Digest.String()}
	for _, d := range ahead {
		all = append(all, d.Digest.String())
	}
	return map[string]string{
		labelImageRef:    "registry.test/img:1",
		labelManifest:    digest.FromString("manifest").String(),
		labelLayer:       layer.Digest.String(),
		labelImageLayers: strings.Join(all, ","),
	}
}

func needFUSE(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE and overlays needs root")
	}
}

// noLeaks checks, once the test and its cleanups are done, that no
// goroutine the test started is left. It ignores nothing else: every
// test unmounts the overlays it made, so no go-fuse server is legitimately
// still serving.
func noLeaks(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// newLifecycleManager returns a Manager over reg with cfg, with a chunk
// cache when withCache; it is closed when the test ends, and nothing may
// then be mounted in the test's directories.
func newLifecycleManager(t *testing.T, reg Registry, cfg Config, withCache bool) *Manager {
	t.Helper()
	checkNothingMounted(t)
	cfg.Staging = filepath.Join(t.TempDir(), "staging")
	if withCache {
		c, err := cache.Open(context.Background(), t.TempDir(), 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		cfg.Lazy.Cache = c
	}
	m, err := New(context.Background(), reg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return m
}

// checkNothingMounted checks, when the test's cleanups are done, that
// nothing is mounted in the test's temporary directories (all of
// t.TempDir's directories share one parent per test).
func checkNothingMounted(t *testing.T) {
	t.Helper()
	base := filepath.Dir(t.TempDir())
	t.Cleanup(func() {
		ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(base))
		if err != nil {
			t.Fatal(err)
		}
		// Deepest first, so a mount inside another goes before it; each
		// is detached so that a failing test leaves nothing behind.
		slices.SortFunc(ms, func(a, b *mountinfo.Info) int { return len(b.Mountpoint) - len(a.Mountpoint) })
		for _, m := range ms {
			t.Errorf("left mounted: %s", m.Mountpoint)
			if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil {
				t.Errorf("detach %s: %v", m.Mountpoint, err)
			}
		}
	})
}

func isMounted(t *testing.T, mp string) bool {
	t.Helper()
	ok, err := mountinfo.Mounted(mp)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return ok
}

// prepareLazy has m serve layer lazily in a new snapshot directory.
func prepareLazy(t *testing.T, m *Manager, layer ocispec.Descriptor) (*Lazy, string) {
	t.Helper()
	dir := snapshotDir(t)
	ll, err := m.Prepare(context.Background(), dir, nil, labelsWith(layer))
	if err != nil || ll == nil {
		t.Fatalf("Prepare: lazy %v, %v", ll != nil, err)
	}
	return ll, dir
}

// localRecorder is the snapshotter's local call: it counts its calls and
// checks that dir/fs then holds exactly want.
type localRecorder struct {
	t    *testing.T
	dir  string
	want map[string]string

	mu     sync.Mutex
	calls  int           // guarded by mu
	called chan struct{} // closed by the first call
}

func newLocalRecorder(t *testing.T, dir string, want map[string]string) *localRecorder {
	return &localRecorder{t: t, dir: dir, want: want, called: make(chan struct{})}
}

func (r *localRecorder) local(ctx context.Context) error {
	got := map[string]string{}
	entries, err := os.ReadDir(filepath.Join(r.dir, "fs"))
	if err != nil {
		r.t.Errorf("local: %v", err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(r.dir, "fs", e.Name()))
		if err != nil {
			r.t.Errorf("local: %v", err)
		}
		got[e.Name()] = string(b)
	}
	if !mapsEqual(got, r.want) {
		r.t.Errorf("when local is called, fs/ holds %v, want %v", got, r.want)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	if r.calls == 1 {
		close(r.called)
	}
	return nil
}

func (r *localRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls
}

func mapsEqual(a, b map[string]string) bool {
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

// stat returns what m reports of the layer in dir ("" state: nothing).
func stat(m *Manager, dir string) layerstatus.Layer {
	var st layerstatus.Layer
	m.Stat(dir, &st, false)
	return st
}

// waitFor polls cond until it holds: the state a test needs.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// exited reports whether ll's population goroutine has returned.
func exited(ll *Lazy) bool {
	ll.mu.Lock()
	ch := ll.exited
	ll.mu.Unlock()
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func stagingEntries(t *testing.T, m *Manager) []string {
	t.Helper()
	entries, err := os.ReadDir(m.cfg.Staging)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// TestLifecyclePopulateRetire: under PolicyAuto a started layer is
// downloaded, handed to the snapshotter once complete, and its FUSE mount
// detached after SwapGrace; it leaves the Manager when the last overlay
// using it is gone, and reads through that overlay work until then.
func TestLifecyclePopulateRetire(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	desc := reg.addEstargz(t, "a", "layer a")
	m := newLifecycleManager(t, reg, Config{
		Policy: PolicyAuto, PopulateDelay: 0, SwapGrace: 50 * time.Millisecond,
		Populate: lazy.PopulateOptions{Quiet: time.Millisecond},
	}, true)
	ll, dir := prepareLazy(t, m, desc)
	lazyDir := filepath.Join(dir, lazyMount)

	// A container started lazily: an overlay over the FUSE mount.
	ovl := t.TempDir()
	if err := unix.Mount("overlay", ovl, "overlay", unix.MS_RDONLY, "lowerdir="+lazyDir+":"+t.TempDir()); err != nil {
		t.Fatal(err)
	}
	mounted := true
	t.Cleanup(func() {
		if mounted {
			unix.Unmount(ovl, unix.MNT_DETACH)
		}
	})
	if b, err := os.ReadFile(filepath.Join(ovl, "a")); err != nil || string(b) != "layer a" {
		t.Fatalf("the container reads %q, %v", b, err)
	}

	rec := newLocalRecorder(t, dir, map[string]string{"a": "layer a"})
	ll.Start(rec.local)
	waitFor(t, "local", func() bool { return rec.count() > 0 })
	waitFor(t, "state local", func() bool { return stat(m, dir).State == stateLocal })
	// retire detaches the mount, then removes lazy/ so that a stale
	// lowerdir fails loudly.
	waitFor(t, "the FUSE mount to be detached and lazy/ removed", func() bool {
		_, err := os.Stat(lazyDir)
		return !isMounted(t, lazyDir) && errors.Is(err, os.ErrNotExist)
	})
	// The container still reads its files through the detached mount,
	// and the Manager still knows the layer.
	if b, err := os.ReadFile(filepath.Join(ovl, "a")); err != nil || string(b) != "layer a" {
		t.Errorf("after the detach the container reads %q, %v", b, err)
	}
	if st := stat(m, dir); st.State != stateLocal {
		t.Errorf("while a container uses the detached mount, state is %q, want %q", st.State, stateLocal)
	}

	if err := unix.Unmount(ovl, 0); err != nil {
		t.Fatal(err)
	}
	mounted = false
	waitFor(t, "the layer to retire", func() bool { return stat(m, dir).State == "" })
	waitFor(t, "population to end", func() bool { return exited(ll) })
	if n := rec.count(); n != 1 {
		t.Errorf("local called %d times, want once", n)
	}
	if names := stagingEntries(t, m); len(names) != 0 {
		t.Errorf("staging keeps %v", names)
	}
}

// TestLifecycleManualPolicy: under PolicyManual nothing of the blob is
// downloaded until Populate releases the layer.
func TestLifecycleManualPolicy(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	desc := reg.addEstargz(t, "a", "layer a")
	m := newLifecycleManager(t, reg, Config{
		Policy: PolicyManual, Populate: lazy.PopulateOptions{Quiet: time.Millisecond},
	}, true)
	ll, dir := prepareLazy(t, m, desc)
	reg.arm(nil, false) // the TOC is read; count what comes after
	rec := newLocalRecorder(t, dir, map[string]string{"a": "layer a"})
	ll.Start(rec.local)

	if n := m.Populate(digest.FromString("not a layer here")); n != 0 {
		t.Errorf("Populate of an unknown digest released %d layers", n)
	}
	// Held: WaitLocal runs out of time, and nothing is fetched.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	err := m.WaitLocal(ctx, desc.Digest)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitLocal of a held layer: %v, want a deadline error", err)
	}
	if r := reg.ranges(); len(r) != 0 {
		t.Errorf("a held layer fetched ranges at %v", r)
	}
	if st := stat(m, dir); st.State != stateLazy || !st.HeldBack {
		t.Errorf("held layer: state %q, held back %v", st.State, st.HeldBack)
	}

	if n := m.Populate(desc.Digest); n != 1 {
		t.Fatalf("Populate released %d layers, want 1", n)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := m.WaitLocal(ctx, desc.Digest); err != nil {
		t.Fatalf("WaitLocal: %v", err)
	}
	if n := rec.count(); n != 1 {
		t.Errorf("WaitLocal returned with local called %d times, want once", n)
	}
	if len(reg.ranges()) == 0 {
		t.Error("population fetched nothing")
	}
	if st := stat(m, dir); st.HeldBack {
		t.Error("the layer is still reported held back")
	}
}

// TestLifecycleReleaseDuringPopulation: Release in mid-download stops
// population, waits for it and leaves nothing behind.
func TestLifecycleReleaseDuringPopulation(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	desc := reg.addEstargz(t, "a", "layer a")
	m := newLifecycleManager(t, reg, Config{
		Policy: PolicyAuto, Populate: lazy.PopulateOptions{Quiet: time.Millisecond},
	}, true)
	ll, dir := prepareLazy(t, m, desc)
	gate := make(chan struct{})
	t.Cleanup(func() { close(gate) })
	reg.arm(gate, false)
	rec := newLocalRecorder(t, dir, nil)
	ll.Start(rec.local)
	select {
	case <-reg.waiting: // population is mid-flight
	case <-time.After(20 * time.Second):
		t.Fatal("population did not start")
	}

	// The download notices the release late: Release waits for it.
	unwind := reg.holdUnwind(t)
	released := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		released <- m.Release(ctx, dir)
	}()
	select {
	case <-reg.cancelled:
	case <-time.After(20 * time.Second):
		t.Fatal("Release did not cancel the download")
	}
	waitReturnedOrBlocked(t, released, "Release waiting", blockedIn("fs/layer.(*Lazy).endPopulation"))
	if !exited(ll) {
		select {
		case <-released:
			t.Fatal("Release returned while the population goroutine still runs")
		default:
		}
	}
	unwind()
	if err := <-released; err != nil {
		t.Fatalf("Release: %v", err)
	}
	if !exited(ll) {
		t.Error("Release returned before the population goroutine ended")
	}
	if n := rec.count(); n != 0 {
		t.Errorf("local called %d times for a released layer", n)
	}
	if names := stagingEntries(t, m); len(names) != 0 {
		t.Errorf("staging keeps %v", names)
	}
	if isMounted(t, filepath.Join(dir, lazyMount)) {
		t.Error("the FUSE mount is left")
	}
	if st := stat(m, dir); st.State != "" {
		t.Errorf("the Manager still reports the released layer: %+v", st)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "fs")); len(entries) != 0 {
		t.Errorf("fs/ of the released layer holds %d entries", len(entries))
	}
}

// TestLifecycleReleaseDuringSwapGrace: Release of a layer that turned
// local but whose FUSE mount waits out SwapGrace ends population at once
// instead of retiring the mount later.
func TestLifecycleReleaseDuringSwapGrace(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	desc := reg.addEstargz(t, "a", "layer a")
	m := newLifecycleManager(t, reg, Config{
		Policy: PolicyAuto, SwapGrace: time.Hour,
		Populate: lazy.PopulateOptions{Quiet: time.Millisecond},
	}, true)
	ll, dir := prepareLazy(t, m, desc)
	rec := newLocalRecorder(t, dir, map[string]string{"a": "layer a"})
	ll.Start(rec.local)
	waitFor(t, "state local", func() bool { return stat(m, dir).State == stateLocal })
	if !isMounted(t, filepath.Join(dir, lazyMount)) {
		t.Fatal("the FUSE mount went before SwapGrace")
	}

	// A population that waited out SwapGrace regardless would hold
	// Release until this context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := m.Release(ctx, dir); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if !exited(ll) {
		t.Error("Release returned before the population goroutine ended")
	}
	if isMounted(t, filepath.Join(dir, lazyMount)) {
		t.Error("the FUSE mount is left")
	}
	if _, err := os.Stat(filepath.Join(dir, lazyMount)); err != nil {
		t.Errorf("lazy/ was removed as by a retire: %v", err)
	}
	if st := stat(m, dir); st.State != "" {
		t.Errorf("the Manager still reports the released layer: %+v", st)
	}
	if n := rec.count(); n != 1 {
		t.Errorf("local called %d times, want once", n)
	}
}

// TestLifecycleVerificationFails: a blob whose bytes do not match the
// layer digest (its TOC being right) is downloaded PopulateAttempts times,
// then the layer stays lazy and says why.
func TestLifecycleVerificationFails(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	const attempts = 2
	reg := newGatedRegistry()
	desc := reg.addEstargz(t, "a", "layer a")
	m := newLifecycleManager(t, reg, Config{
		Policy: PolicyAuto, PopulateAttempts: attempts,
		Populate: lazy.PopulateOptions{Quiet: time.Millisecond},
	}, true)
	ll, dir := prepareLazy(t, m, desc)
	reg.arm(nil, true)
	rec := newLocalRecorder(t, dir, nil)
	ll.Start(rec.local)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := m.WaitLocal(ctx, desc.Digest); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitLocal: %v, want population's failure", err)
	}
	waitFor(t, "population to end", func() bool { return exited(ll) })
	downloads := 0
	ranges := reg.ranges()
	for _, off := range ranges {
		if off == 0 {
			downloads++
		}
	}
	if downloads != attempts {
		t.Errorf("the blob was downloaded %d times, want %d (ranges at %v)", downloads, attempts, ranges)
	}
	st := stat(m, dir)
	if st.State != stateFailed || st.Error == "" {
		t.Errorf("status: state %q, error %q; want %q and why", st.State, st.Error, stateFailed)
	}
	if n := rec.count(); n != 0 {
		t.Errorf("local called %d times for a bad blob", n)
	}
	// Asking again downloads nothing: the layer stays lazy.
	m.Populate(desc.Digest)
	if err := m.WaitLocal(ctx, desc.Digest); err == nil {
		t.Error("WaitLocal after the failure succeeded")
	}
	if got := reg.ranges(); len(got) != len(ranges) {
		t.Errorf("%d more ranges fetched after population gave up", len(got)-len(ranges))
	}
	// The layer is still served lazily from verified chunks.
	if b, err := os.ReadFile(filepath.Join(dir, lazyMount, "a")); err != nil || string(b) != "layer a" {
		t.Errorf("the lazy layer reads %q, %v", b, err)
	}
}

// TestFetchUrgentSkipsQueue: a layer containerd waits for is fetched at
// once even when it was queued to be fetched ahead behind a layer that
// holds the only slot.
func TestFetchUrgentSkipsQueue(t *testing.T) {
	noLeaks(t)
	reg := newGatedRegistry()
	a := reg.addGzip(t, "a", "layer a")
	b := reg.addGzip(t, "b", "layer b")
	c := reg.addGzip(t, "c", "layer c")
	d := reg.addGzip(t, "d", "layer d")
	m := newLifecycleManager(t, reg, Config{ConcurrentLayers: 1}, false)
	holdB := reg.holdOpen(b.Digest)
	t.Cleanup(func() { close(holdB) })
	// Every layer here is one containerd waits for, or fetched ahead.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// b, fetched ahead of a, takes the only slot and hangs.
	if _, err := m.Prepare(ctx, snapshotDir(t), nil, labelsWith(a, b)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-reg.opening:
	case <-time.After(20 * time.Second):
		t.Fatal("b is not fetched ahead")
	}
	// c, fetched ahead of d, queues behind b.
	if _, err := m.Prepare(ctx, snapshotDir(t), nil, labelsWith(d, c)); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	_, queued := m.jobs[c.Digest]
	m.mu.Unlock()
	if !queued || reg.openCount(c.Digest) != 0 {
		t.Fatalf("c: queued %v, opened %d times; want queued, not opened", queued, reg.openCount(c.Digest))
	}

	// containerd now waits for c.
	dir := snapshotDir(t)
	if _, err := m.Prepare(ctx, dir, nil, labelsWith(c)); err != nil {
		t.Fatalf("Prepare of c while b holds the slot: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "fs", "c")); err != nil || string(got) != "layer c" {
		t.Errorf("c is %q, %v", got, err)
	}
}

// TestFetchSameLayerTwice: two snapshots of one layer prepared at once each
// get the whole tree.
func TestFetchSameLayerTwice(t *testing.T) {
	noLeaks(t)
	reg := newGatedRegistry()
	a := reg.addGzip(t, "a", "layer a")
	m := newLifecycleManager(t, reg, Config{}, false)
	hold := reg.holdOpen(a.Digest)

	dirs := []string{snapshotDir(t), snapshotDir(t)}
	errs := make(chan error, len(dirs))
	for _, dir := range dirs {
		go func() {
			_, err := m.Prepare(context.Background(), dir, nil, labelsWith(a))
			errs <- err
		}()
	}
	select {
	case <-reg.opening:
	case <-time.After(20 * time.Second):
		t.Fatal("a is not fetched")
	}
	waitInStack(t, "(*Manager).fetch", 2) // both wait for the one fetch
	close(hold)
	for range dirs {
		select {
		case err := <-errs:
			if err != nil {
				t.Errorf("Prepare: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("Prepare does not return")
		}
	}
	for _, dir := range dirs {
		if got, err := os.ReadFile(filepath.Join(dir, "fs", "a")); err != nil || string(got) != "layer a" {
			t.Errorf("%s: a is %q, %v", dir, got, err)
		}
	}
	if names := stagingEntries(t, m); len(names) != 0 {
		t.Errorf("staging keeps %v", names)
	}
}

// TestFetchStagingLimit: layers that would pass StagingLimit are not
// fetched ahead; Staging reports what is.
func TestFetchStagingLimit(t *testing.T) {
	noLeaks(t)
	reg := newGatedRegistry()
	a := reg.addGzip(t, "a", "layer a")
	b := reg.addGzip(t, "b", "layer b")
	c := reg.addGzip(t, "c", "layer c")
	m := newLifecycleManager(t, reg, Config{StagingLimit: b.Size}, false)
	ctx := context.Background()

	if _, err := m.Prepare(ctx, snapshotDir(t), nil, labelsWith(a, b, c)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to be staged", func() bool { return m.Staging().Bytes > 0 })
	st := m.Staging()
	if st.Layers != 1 || st.Reserved != b.Size || st.Limit != b.Size {
		t.Errorf("Staging: %+v, want b alone (%d bytes reserved, limit %d)", st, b.Size, b.Size)
	}
	if n := reg.openCount(c.Digest); n != 0 {
		t.Errorf("c, over the staging limit, was fetched ahead (%d opens)", n)
	}
	for _, l := range []ocispec.Descriptor{c, b} {
		dir := snapshotDir(t)
		if _, err := m.Prepare(ctx, dir, nil, labelsWith(l)); err != nil {
			t.Fatal(err)
		}
	}
	if n := reg.openCount(b.Digest); n != 1 {
		t.Errorf("b was fetched %d times; its staged tree should have been used", n)
	}
	if st := m.Staging(); st.Layers != 0 || st.Reserved != 0 || st.Bytes != 0 {
		t.Errorf("Staging after the claims: %+v", st)
	}
	if names := stagingEntries(t, m); len(names) != 0 {
		t.Errorf("staging keeps %v", names)
	}
}

// TestFetchStagedTTL: a tree fetched ahead that nobody claims is deleted
// after StagedTTL; a later Prepare fetches the layer again.
func TestFetchStagedTTL(t *testing.T) {
	noLeaks(t)
	reg := newGatedRegistry()
	a := reg.addGzip(t, "a", "layer a")
	b := reg.addGzip(t, "b", "layer b")
	m := newLifecycleManager(t, reg, Config{StagedTTL: 50 * time.Millisecond}, false)
	ctx := context.Background()

	if _, err := m.Prepare(ctx, snapshotDir(t), nil, labelsWith(a, b)); err != nil {
		t.Fatal(err)
	}
	// The job is forgotten first, then its tree deleted.
	waitFor(t, "b's staged tree to expire", func() bool {
		m.mu.Lock()
		_, ok := m.jobs[b.Digest]
		m.mu.Unlock()
		return !ok && len(stagingEntries(t, m)) == 0
	})
	if n := reg.openCount(b.Digest); n != 1 {
		t.Fatalf("b was fetched %d times ahead, want once", n)
	}
	if st := m.Staging(); st.Layers != 0 {
		t.Errorf("Staging after the TTL: %+v", st)
	}
	dir := snapshotDir(t)
	if _, err := m.Prepare(ctx, dir, nil, labelsWith(b)); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "fs", "b")); err != nil || string(got) != "layer b" {
		t.Errorf("b is %q, %v", got, err)
	}
	if n := reg.openCount(b.Digest); n != 2 {
		t.Errorf("b was fetched %d times, want twice", n)
	}
}

// TestManagerCloseStopsEverything: Close ends held population, fetches in
// flight and queued, and detaches mounts; nothing of the Manager runs
// afterwards.
func TestManagerCloseStopsEverything(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	e1 := reg.addEstargz(t, "e1", "lazy one")
	g1 := reg.addGzip(t, "g1", "fetched ahead, hangs")
	g2 := reg.addGzip(t, "g2", "queued")
	e2 := reg.addEstargz(t, "e2", "TOC read ahead")
	holdG1 := reg.holdOpen(g1.Digest)
	t.Cleanup(func() { close(holdG1) })
	checkNothingMounted(t)

	c, err := cache.Open(context.Background(), t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	staging := filepath.Join(t.TempDir(), "staging")
	m, err := New(context.Background(), reg, Config{
		Staging: staging, ConcurrentLayers: 1, Policy: PolicyManual, Lazy: lazy.Options{Cache: c},
	})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			m.Close()
		}
	})
	dir := snapshotDir(t)
	ll, err := m.Prepare(context.Background(), dir, nil, labelsWith(e1, g1, g2, e2))
	if err != nil || ll == nil {
		t.Fatalf("Prepare: lazy %v, %v", ll != nil, err)
	}
	rec := newLocalRecorder(t, dir, nil)
	ll.Start(rec.local) // held by the policy
	select {
	case <-reg.opening: // g1 holds the slot, g2 waits for it
	case <-time.After(20 * time.Second):
		t.Fatal("g1 is not fetched ahead")
	}
	// A second lazy layer, mounted and never started.
	_, dir2 := prepareLazy(t, m, e2)

	// g1's fetch notices the close late: Close waits for it.
	unwind := reg.holdUnwind(t)
	closeErr := make(chan error, 1)
	go func() { closeErr <- m.Close() }()
	select {
	case <-reg.cancelled:
	case <-time.After(20 * time.Second):
		t.Fatal("Release did not cancel the download")
	}
	waitReturnedOrBlocked(t, closeErr, "Close waiting", func(g string) bool {
		return strings.Contains(g, "sync.(*WaitGroup).Wait(") && strings.Contains(g, "fs/layer.(*Manager).Close(")
	})
	select {
	case <-closeErr:
		t.Fatal("Close returned while a fetch it started still runs")
	default:
	}
	unwind()
	if err := <-closeErr; err != nil {
		t.Errorf("Close: %v", err)
	}
	closed = true
	if !exited(ll) {
		t.Error("population is still running after Close")
	}
	for _, d := range []string{dir, dir2} {
		if isMounted(t, filepath.Join(d, lazyMount)) {
			t.Errorf("%s is still mounted after Close", d)
		}
	}
	if _, err := os.Stat(staging); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("staging is left: %v", err)
	}
	if n := rec.count(); n != 0 {
		t.Errorf("local called %d times", n)
	}
	if _, err := m.Prepare(context.Background(), snapshotDir(t), nil, labelsWith(g2)); err == nil {
		t.Error("Prepare after Close succeeded")
	}
}

// waitInStack waits until n goroutines are inside fn (as runtime stacks
// name it, e.g. "(*Manager).fetch").
func waitInStack(t *testing.T, fn string, n int) {
	t.Helper()
	waitFor(t, "goroutines in "+fn, func() bool {
		got := 0
		for _, g := range goroutines() {
			if strings.Contains(g, fn+"(") {
				got++
			}
		}
		return got >= n
	})
}

// goroutines returns the stacks of all goroutines.
func goroutines() []string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Split(string(buf), "\n\n")
}

// waitReturnedOrBlocked waits until the call that sends on done has
// returned (leaving its value there) or some goroutine's stack satisfies
// blocked.
func waitReturnedOrBlocked(t *testing.T, done chan error, what string, blocked func(stack string) bool) {
	t.Helper()
	waitFor(t, "a return or "+what, func() bool {
		select {
		case err := <-done:
			done <- err
			return true
		default:
		}
		return slices.ContainsFunc(goroutines(), blocked)
	})
}

// blockedIn reports whether a goroutine stack's top frame is in fn.
func blockedIn(fn string) func(string) bool {
	return func(stack string) bool {
		lines := strings.Split(stack, "\n")
		return len(lines) > 1 && strings.Contains(lines[1], fn+"(")
	}
}

// TestLifecycleManualReleaseSurvivesRestart: under PolicyManual, a layer
// whose population Populate released resumes it as soon as the next
// Manager restores it, with no Populate of its own; a layer never released
// stays held.
func TestLifecycleManualReleaseSurvivesRestart(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	reg := newGatedRegistry()
	a := reg.addEstargz(t, "a", "layer a")
	b := reg.addEstargz(t, "b", "layer b")
	cfg := Config{Policy: PolicyManual, Populate: lazy.PopulateOptions{Quiet: time.Millisecond}}
	m1 := newLifecycleManager(t, reg, cfg, true)
	llA, dirA := prepareLazy(t, m1, a)
	llB, dirB := prepareLazy(t, m1, b)
	gate := make(chan struct{})
	reg.arm(gate, false)
	llA.Start(newLocalRecorder(t, dirA, nil).local)
	llB.Start(newLocalRecorder(t, dirB, nil).local)
	if n := m1.Populate(a.Digest); n != 1 {
		t.Fatalf("Populate released %d layers, want 1", n)
	}
	select {
	case <-reg.waiting: // a's population waits for the registry
	case <-time.After(20 * time.Second):
		t.Fatal("the released layer fetched nothing")
	}
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}

	m2 := newLifecycleManager(t, reg, cfg, true)
	close(gate)
	recA := newLocalRecorder(t, dirA, map[string]string{"a": "layer a"})
	recB := newLocalRecorder(t, dirB, nil)
	for _, l := range []struct {
		dir string
		rec *localRecorder
	}{{dirA, recA}, {dirB, recB}} {
		ll, err := m2.Restore(context.Background(), l.dir, nil)
		if err != nil {
			t.Fatalf("Restore: %v", err)
		}
		ll.Start(l.rec.local)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := m2.WaitLocal(ctx, a.Digest); err != nil {
		t.Fatalf("the released layer after a restart: %v", err)
	}
	if n := recA.count(); n != 1 {
		t.Errorf("local called %d times for the released layer, want once", n)
	}
	if st := stat(m2, dirB); st.State != stateLazy || !st.HeldBack || recB.count() != 0 {
		t.Errorf("the layer never released, after a restart: state %q, held back %v, local called %d times",
			st.State, st.HeldBack, recB.count())
	}
}

// TestLifecycleDiffID: population checks the layer against the diff ID
// containerd names its snapshot after. With the image config's right diff
// ID the layer turns local; with another, population gives up after one
// download (the blob matched its digest: fetching again cannot help), the
// layer never turns local and is still served lazily, and after a restart
// the restored layer is checked again.
func TestLifecycleDiffID(t *testing.T) {
	needFUSE(t)
	noLeaks(t)
	for _, c := range []struct {
		name  string
		right bool
	}{
		{"right", true},
		{"other", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			reg := newGatedRegistry()
			desc := reg.addEstargz(t, "a", "layer a")
			diffID := digest.FromString("another layer's tar")
			if c.right {
				zr, err := gzip.NewReader(bytes.NewReader(reg.blobs[desc.Digest]))
				if err != nil {
					t.Fatal(err)
				}
				h := digest.SHA256.Digester()
				if _, err := io.Copy(h.Hash(), zr); err != nil {
					t.Fatal(err)
				}
				diffID = h.Digest()
			}
			m := newLifecycleManager(t, reg, Config{
				Policy: PolicyAuto, PopulateAttempts: 3,
				Populate: lazy.PopulateOptions{Quiet: time.Millisecond},
			}, true)
			labels := labelsWith(desc)
			labels[labelDiffID] = diffID.String()
			dir := snapshotDir(t)
			ll, err := m.Prepare(context.Background(), dir, nil, labels)
			if err != nil || ll == nil {
				t.Fatalf("Prepare: lazy %v, %v", ll != nil, err)
			}
			reg.arm(nil, false)
			rec := newLocalRecorder(t, dir, map[string]string{"a": "layer a"})
			ll.Start(rec.local)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err = m.WaitLocal(ctx, desc.Digest)
			if c.right {
				if err != nil {
					t.Fatalf("WaitLocal with the config's diff ID: %v", err)
				}
				return
			}
			if err == nil || !errors.Is(err, extract.ErrDiffID) {
				t.Fatalf("WaitLocal: %v, want the diff ID's mismatch", err)
			}
			waitFor(t, "population to end", func() bool { return exited(ll) })
			downloads := 0
			for _, off := range reg.ranges() {
				if off == 0 {
					downloads++
				}
			}
			if downloads != 1 {
				t.Errorf("the blob was downloaded %d times, want once", downloads)
			}
			if st := stat(m, dir); st.State != stateFailed || !strings.Contains(st.Error, "diff ID") {
				t.Errorf("status: state %q, error %q; want %q and the diff ID", st.State, st.Error, stateFailed)
			}
			if n := rec.count(); n != 0 {
				t.Errorf("local called %d times for a layer the config misnames", n)
			}
			if b, err := os.ReadFile(filepath.Join(dir, lazyMount, "a")); err != nil || string(b) != "layer a" {
				t.Errorf("the lazy layer reads %q, %v", b, err)
			}

			// The diff ID is kept with the layer: a restarted daemon
			// checks it too.
			if err := m.Close(); err != nil {
				t.Fatal(err)
			}
			m2 := newLifecycleManager(t, reg, Config{
				Policy: PolicyAuto, PopulateAttempts: 3,
				Populate: lazy.PopulateOptions{Quiet: time.Millisecond},
			}, true)
			ll2, err := m2.Restore(context.Background(), dir, nil)
			if err != nil {
				t.Fatalf("Restore: %v", err)
			}
			rec2 := newLocalRecorder(t, dir, nil)
			ll2.Start(rec2.local)
			if err := m2.WaitLocal(ctx, desc.Digest); !errors.Is(err, extract.ErrDiffID) {
				t.Errorf("after a restart, WaitLocal: %v, want the diff ID's mismatch", err)
			}
			if n := rec2.count(); n != 0 {
				t.Errorf("after a restart, local called %d times for a layer the config misnames", n)
			}
		})
	}
}
