package remote

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRangeBufMappedAndFreed: a range buffer is mapped memory, usable
// whole, and freeing it unmaps it (a second unmap finds nothing).
func TestRangeBufMappedAndFreed(t *testing.T) {
	const n = 1 << 20
	b := newRangeBuf(n)
	if len(b) != n || cap(b) != n {
		t.Fatalf("buffer of %d bytes (cap %d), want %d", len(b), cap(b), n)
	}
	b[0], b[n-1] = 1, 2
	freeRangeBuf(b[:10]) // as parts hold them: shorter than their capacity
	if err := unix.Munmap(b); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("second unmap: %v, want EINVAL (freeRangeBuf left it mapped)", err)
	}
	// Heap memory is left to the garbage collector.
	freeRangeBuf(make([]byte, 10))
	freeRangeBuf(nil)
}
