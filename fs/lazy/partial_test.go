package lazy

import (
	"context"
	"errors"
	"io"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

func TestPartialRanges(t *testing.T) {
	for _, tc := range []struct {
		name    string
		writes  []span
		forget  []span
		missing []span // with ranges of at most 10 bytes
	}{
		{name: "empty", missing: []span{{0, 10}, {10, 20}, {20, 25}}},
		{name: "merge adjacent", writes: []span{{0, 5}, {5, 10}, {20, 25}}, missing: []span{{10, 20}}},
		{name: "overlap", writes: []span{{2, 8}, {6, 14}}, missing: []span{{0, 2}, {14, 24}, {24, 25}}},
		{name: "all", writes: []span{{0, 25}}},
		{name: "forget middle", writes: []span{{0, 25}}, forget: []span{{5, 7}}, missing: []span{{5, 7}}},
		{name: "forget across", writes: []span{{0, 5}, {10, 15}}, forget: []span{{3, 12}},
			missing: []span{{3, 12}, {15, 25}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := openPartial(filepath.Join(t.TempDir(), "blob"), 25)
			if err != nil {
				t.Fatal(err)
			}
			defer p.close()
			for _, w := range tc.writes {
				if err := p.WriteAt(make([]byte, w.len()), w.start); err != nil {
					t.Fatal(err)
				}
			}
			for _, f := range tc.forget {
				p.forget(f)
			}
			if got := p.missing(10); !reflect.DeepEqual(got, tc.missing) {
				t.Errorf("missing %v, want %v", got, tc.missing)
			}
		})
	}
}

func TestPartialSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blob")
	p, _ := openPartial(path, 100)
	p.WriteAt([]byte("abc"), 10)
	if err := p.close(); err != nil {
		t.Fatal(err)
	}
	q, err := openPartial(path, 100)
	if err != nil {
		t.Fatal(err)
	}
	defer q.close()
	if !q.has(span{10, 13}) || q.held() != 3 {
		t.Errorf("after reopening: held %d bytes, has 10-13: %v", q.held(), q.has(span{10, 13}))
	}
	if err := q.WriteAt([]byte("x"), 100); err == nil {
		t.Error("a write past the blob's end was accepted")
	}
}

func TestPartialMissingIn(t *testing.T) {
	p, err := openPartial(filepath.Join(t.TempDir(), "blob"), 100)
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	for _, w := range []span{{10, 20}, {30, 40}} {
		if err := p.WriteAt(make([]byte, w.len()), w.start); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		in   span
		want []span
	}{
		{span{0, 100}, []span{{0, 10}, {20, 30}, {40, 100}}},
		{span{12, 18}, nil},
		{span{15, 35}, []span{{20, 30}}},
		{span{5, 12}, []span{{5, 10}}},
		{span{38, 50}, []span{{40, 50}}},
		{span{50, 60}, []span{{50, 60}}},
	} {
		if got := p.missingIn(tc.in, 1000); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("missingIn(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestPartialFollow(t *testing.T) {
	p, err := openPartial(filepath.Join(t.TempDir(), "blob"), 10)
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	p.WriteAt([]byte("0123"), 0)
	r := p.follow(context.Background())
	got := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(r)
		got <- b
	}()
	select {
	case b := <-got:
		t.Fatalf("follow returned %q before the blob was complete", b)
	case <-time.After(50 * time.Millisecond):
	}
	p.WriteAt([]byte("89"), 8)
	p.WriteAt([]byte("4567"), 4)
	if b := <-got; string(b) != "0123456789" {
		t.Errorf("follow read %q", b)
	}

	ctx, cancel := context.WithCancelCause(context.Background())
	q, _ := openPartial(filepath.Join(t.TempDir(), "blob2"), 10)
	defer q.close()
	stop := errors.New("download failed")
	cancel(stop)
	if _, err := io.ReadAll(q.follow(ctx)); !errors.Is(err, stop) {
		t.Errorf("follow on a cancelled context: %v, want %v", err, stop)
	}
}
