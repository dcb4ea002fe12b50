package lazy

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func TestLinkEstimate(t *testing.T) {
	var e linkEstimate
	if got := e.bdp(64<<10, 16<<20); got != 64<<10 {
		t.Errorf("bandwidth-delay product before any request: %d, want the lower bound", got)
	}
	// A small reply tells the round trip, not the throughput.
	e.observe(20*time.Millisecond, 21*time.Millisecond, 4<<10)
	if got := e.bdp(64<<10, 16<<20); got != 64<<10 {
		t.Errorf("bandwidth-delay product after only a small reply: %d, want the lower bound", got)
	}
	// 1 MiB in 100 ms at a 20 ms round trip: 13.1 MB/s × 20 ms.
	e.observe(20*time.Millisecond, 100*time.Millisecond, 1<<20)
	if got, want := e.bdp(64<<10, 16<<20), int64(1<<20)/4; got < want*9/10 || got > want*11/10 {
		t.Errorf("bandwidth-delay product of 1 MiB per 80 ms at a 20 ms round trip: %d, want about %d", got, want)
	}
	if got := e.bdp(64<<10, 128<<10); got != 128<<10 {
		t.Errorf("bandwidth-delay product above the upper bound: %d, want 128 KiB", got)
	}
	// A reply that waited in a queue behind others, and came slowly,
	// tells nothing new of the link.
	e.observe(400*time.Millisecond, 800*time.Millisecond, 1<<20)
	if got, want := e.bdp(64<<10, 16<<20), int64(1<<20)/4; got < want*9/10 || got > want*11/10 {
		t.Errorf("bandwidth-delay product after a queued reply: %d, want still about %d", got, want)
	}
}

// smallFilesLayer opens a layer of n files of size random bytes each,
// f000, f001, ..., in that order in the blob, served by blob.
func smallFilesLayer(t *testing.T, n, size int, blob func(data []byte) Blob, o Options) (*Layer, [][]byte) {
	t.Helper()
	var entries []tarEntry
	var bodies [][]byte
	for i := range n {
		body := randomBytes(int64(100+i), size)
		bodies = append(bodies, body)
		entries = append(entries, tarEntry{
			hdr:  tar.Header{Name: fmt.Sprintf("f%03d", i), Typeflag: tar.TypeReg, Mode: 0o644},
			body: body,
		})
	}
	data, desc := blobOf(t, entries)
	l := openLayer(t, data, blob(data), desc, o)
	t.Cleanup(func() { l.Close() })
	return l, bodies
}

// names returns the files whose chunks cs are, in order.
func names(t *testing.T, l *Layer, cs []chunk) []string {
	t.Helper()
	var out []string
	for _, c := range cs {
		for i := range 1000 {
			name := fmt.Sprintf("f%03d", i)
			num, ok := l.ix.lookup(&l.ix.entries[0], name)
			if !ok {
				t.Fatalf("chunk at %d belongs to no file", c.offset)
			}
			if fc := l.ix.fileChunks(&l.ix.entries[num]); len(fc) > 0 && fc[0].offset == c.offset {
				out = append(out, name)
				break
			}
		}
	}
	return out
}

// TestPlanBringsNeighbours: a read of a small file brings the files after
// it in the blob along, as far as MinRequest at first, and as far as the
// link's bandwidth-delay product once it has been measured; never for a
// layer told to fetch only what reads need.
func TestPlanBringsNeighbours(t *testing.T) {
	const size = 10 << 10 // random: each file's stream is a little over 10 KiB
	l, _ := smallFilesLayer(t, 40, size, func(d []byte) Blob { return &testBlob{data: d} }, Options{MinRequest: 32 << 10})
	f3 := chunksOf(t, l, "f003")
	plan := l.f.plan(f3, 0, len(f3))
	if got, want := fmt.Sprint(names(t, l, plan)), "[f003 f004 f005]"; got != want {
		t.Errorf("a read of f003 with 32 KiB requests brings %s, want %s", got, want)
	}

	// 1 MiB per 80 ms after a 20 ms round trip: about 256 KiB in flight.
	l.f.act.link.observe(20*time.Millisecond, 100*time.Millisecond, 1<<20)
	plan = l.f.plan(f3, 0, len(f3))
	reach := l.f.reach()
	if reach < 200<<10 || reach > 300<<10 {
		t.Fatalf("reach on a link of 256 KiB bandwidth-delay product: %d", reach)
	}
	last := plan[len(plan)-1]
	if extent := last.end - plan[0].offset; extent > reach {
		t.Errorf("the plan covers %d bytes of the blob, more than the reach %d", extent, reach)
	}
	if next := l.f.ix.after(last.end, 1<<62); len(next) > 0 && next[0].end-plan[0].offset <= reach {
		t.Errorf("the plan stops at %s though the next file fits within reach", names(t, l, plan[len(plan)-1:]))
	}
	if len(plan) < 15 {
		t.Errorf("a read of f003 on a 256 KiB link brings %d files, want about 20", len(plan))
	}

	only, _ := smallFilesLayer(t, 4, size, func(d []byte) Blob { return &testBlob{data: d} }, Options{MinRequest: -1})
	f1 := chunksOf(t, only, "f001")
	if got := names(t, only, only.f.plan(f1, 0, len(f1))); fmt.Sprint(got) != "[f001]" {
		t.Errorf("without MinRequest a read of f001 brings %v", got)
	}
}

// gatedBlob holds every request until gate requests are under way at once,
// and records the most ever under way.
type gatedBlob struct {
	testBlob
	gate     int64
	open     chan struct{}
	once     sync.Once
	inflight atomic.Int64
	most     atomic.Int64
}

func (b *gatedBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	now := b.inflight.Add(1)
	defer b.inflight.Add(-1)
	for {
		m := b.most.Load()
		if now <= m || b.most.CompareAndSwap(m, now) {
			break
		}
	}
	if now >= b.gate {
		b.once.Do(func() { close(b.open) })
	}
	select {
	case <-b.open:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return b.testBlob.ReadRange(ctx, off, n)
}

// TestApartRequestsGoTogether: chunks one load needs from parts of the blob
// apart from each other are fetched by requests under way together, at most
// maxParallel at once.
func TestApartRequestsGoTogether(t *testing.T) {
	var gb *gatedBlob
	l, bodies := smallFilesLayer(t, 40, 10<<10, func(d []byte) Blob {
		gb = &gatedBlob{testBlob: testBlob{data: d}, gate: maxParallel, open: make(chan struct{})}
		return gb
	}, Options{MinRequest: -1})
	var cs []chunk
	var ds []digest.Digest
	for i := 0; i < 40; i += 5 { // 8 files apart from each other
		c := chunksOf(t, l, fmt.Sprintf("f%03d", i))
		cs = append(cs, c...)
		for _, c := range c {
			ds = append(ds, c.dgst())
		}
	}
	// Sequential requests would wait for each other at the gate until
	// this context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, err := l.f.fetch(ctx, cs, ds, nil)
	if err != nil {
		t.Fatalf("fetch of 8 files apart: %v", err)
	}
	if n := gb.requests.Load(); n != 8 {
		t.Errorf("8 files apart took %d requests, want 8", n)
	}
	if m := gb.most.Load(); m != maxParallel {
		t.Errorf("at most %d requests were under way at once, want %d", m, maxParallel)
	}
	for k, i := 0, 0; i < 40; k, i = k+1, i+5 {
		if !bytes.Equal(got[ds[k]], bodies[i]) {
			t.Errorf("f%03d: wrong bytes", i)
		}
	}
}

// countingReader counts its reads.
type countingReader struct {
	r     io.Reader
	reads atomic.Int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	c.reads.Add(1)
	return c.r.Read(b)
}

// TestExtractionYields: population's extraction reads nothing while an
// on-demand request is under way, and goes on once none has been for the
// quiet time.
func TestExtractionYields(t *testing.T) {
	act := new(Activity)
	src := &countingReader{r: bytes.NewReader([]byte("layer bytes"))}
	act.start() // a container's read, under way
	ctx, cancel := context.WithCancel(context.Background())
	y := yielding{ctx: ctx, r: src, act: act, quiet: time.Nanosecond}
	done := make(chan error, 1)
	go func() {
		_, err := y.Read(make([]byte, 4))
		done <- err
	}()
	cancel()
	if err := <-done; err == nil {
		t.Error("extraction read while an on-demand request was under way")
	}
	if n := src.reads.Load(); n != 0 {
		t.Errorf("extraction read its source %d times while an on-demand request was under way", n)
	}

	act.done()
	y.ctx = context.Background()
	b := make([]byte, 5)
	if n, err := y.Read(b); err != nil || string(b[:n]) != "layer" {
		t.Errorf("extraction once the link is quiet: %q, %v", b[:n], err)
	}
}

// TestPlanFetchesSmallFilesWhole: a read of one chunk of a file of a few
// chunks brings the file's other chunks, the ones it needs first.
func TestPlanFetchesSmallFilesWhole(t *testing.T) {
	data, desc, _ := buildLayer(t) // data/big: 3 MiB in 256 KiB chunks
	l := openLayer(t, data, &testBlob{data: data}, desc, Options{})
	t.Cleanup(func() { l.Close() })
	big := chunksOf(t, l, "data/big")
	if len(big) < 3 {
		t.Fatalf("data/big has %d chunks", len(big))
	}
	plan := l.f.plan(big, 2, 3)
	if plan[0] != big[2] {
		t.Errorf("the plan for a read of chunk 2 starts with the chunk at %d", plan[0].offset)
	}
	in := map[int64]bool{}
	for _, c := range plan {
		in[c.fileOff] = true
	}
	for _, c := range big {
		if !in[c.fileOff] {
			t.Errorf("a read of data/big's chunk 2 leaves its chunk at file offset %d", c.fileOff)
		}
	}
}

// pausingBlob serves its first request's first piece, then holds the rest
// of that reply until release is closed; later requests are served at once.
type pausingBlob struct {
	testBlob
	paused  chan struct{} // closed once the first piece is read
	release chan struct{}
	mu      sync.Mutex
	offsets []int64 // where each request started
}

func (b *pausingBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	b.mu.Lock()
	first := len(b.offsets) == 0
	b.offsets = append(b.offsets, off)
	b.mu.Unlock()
	rc, err := b.testBlob.ReadRange(ctx, off, n)
	if err != nil || !first {
		return rc, err
	}
	return io.NopCloser(&pausingReader{r: rc, b: b}), nil
}

type pausingReader struct {
	r    io.Reader
	b    *pausingBlob
	read int
}

func (p *pausingReader) Read(buf []byte) (int, error) {
	if p.read >= readPiece {
		select {
		case <-p.b.paused:
		default:
			close(p.b.paused)
		}
		<-p.b.release
	}
	n, err := p.r.Read(buf[:min(len(buf), readPiece)])
	p.read += n
	return n, err
}

// TestPopulateLeavesTheLinkToReads: a population request under way when an
// on-demand request starts stops after what has arrived; population
// fetches the rest later, and no byte twice.
func TestPopulateLeavesTheLinkToReads(t *testing.T) {
	data, desc, files := buildLayer(t)
	blob := &pausingBlob{testBlob: testBlob{data: data}, paused: make(chan struct{}), release: make(chan struct{})}
	l := openLayer(t, data, blob, desc, Options{})
	t.Cleanup(func() { l.Close() })
	tree := t.TempDir()
	done := make(chan error, 1)
	go func() {
		done <- l.Populate(context.Background(), tree, PopulateOptions{Concurrency: 1, RangeSize: 64 << 20, Quiet: time.Nanosecond})
	}()
	<-blob.paused
	// A container's read starts a request to the registry.
	l.f.act.start()
	l.f.act.requests.Add(1)
	l.f.act.done()
	close(blob.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	blob.mu.Lock()
	offsets := blob.offsets
	blob.mu.Unlock()
	if len(offsets) < 2 || offsets[1] <= offsets[0] {
		t.Errorf("population's requests started at %v: want its first one stopped and the rest fetched after", offsets)
	}
	if p := l.Progress(); p.Held != p.Size || p.Fetched > p.Size {
		t.Errorf("the local copy holds %d of %d bytes; population fetched %d", p.Held, p.Size, p.Fetched)
	}
	if b, err := os.ReadFile(filepath.Join(tree, "data/big")); err != nil || !bytes.Equal(b, files["data/big"]) {
		t.Errorf("data/big after population: %v", err)
	}
}

// TestPopulateYieldsToAPull: on-demand work that is not a read (the pull of
// another image, marked with Activity.Begin by the layer manager) stops a
// population request under way, holds population while it lasts, and lets
// it finish once it ended.
func TestPopulateYieldsToAPull(t *testing.T) {
	data, desc, files := buildLayer(t)
	act := new(Activity) // shared with the manager and the other layers
	blob := &pausingBlob{testBlob: testBlob{data: data}, paused: make(chan struct{}), release: make(chan struct{})}
	l := openLayer(t, data, blob, desc, Options{Activity: act})
	t.Cleanup(func() { l.Close() })
	tree := t.TempDir()
	done := make(chan error, 1)
	go func() {
		done <- l.Populate(context.Background(), tree, PopulateOptions{Concurrency: 1, RangeSize: 64 << 20, Quiet: time.Nanosecond})
	}()
	<-blob.paused
	end := act.Begin() // a Prepare starts
	close(blob.release)
	// While the pull lasts, population makes no request: a cancelled
	// second population of a held activity returns without one.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.f.act.waitQuiet(ctx, time.Nanosecond); err == nil {
		t.Error("population found the link quiet while a pull was under way")
	}
	end()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	blob.mu.Lock()
	offsets := blob.offsets
	blob.mu.Unlock()
	if len(offsets) < 2 || offsets[1] <= offsets[0] {
		t.Errorf("population's requests started at %v: want its first one stopped by the pull and the rest fetched after", offsets)
	}
	if b, err := os.ReadFile(filepath.Join(tree, "data/big")); err != nil || !bytes.Equal(b, files["data/big"]) {
		t.Errorf("data/big after population: %v", err)
	}
}

// TestHoldForAStartingContainer: Hold keeps population waiting past the
// quiet time, until the held time passed or the container's reads took
// over and went quiet.
func TestHoldForAStartingContainer(t *testing.T) {
	act := new(Activity)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	if err := act.waitQuiet(cancelled, time.Nanosecond); err != nil {
		t.Fatalf("a fresh activity is not quiet: %v", err)
	}
	act.Hold(time.Hour)
	if err := act.waitQuiet(cancelled, time.Nanosecond); err == nil {
		t.Error("population found the link quiet while a container was starting")
	}
	act.start() // the container's first read
	act.done()
	if err := act.waitQuiet(context.Background(), time.Nanosecond); err != nil {
		t.Errorf("after the container's reads went quiet: %v", err)
	}
}
