package remote

import (
	"golang.org/x/sys/unix"
)

// Range buffers live outside the Go heap. They are the bulk of what the
// full-fetch path holds (Concurrency × RangeSize, 16 MiB by default), and
// on the heap they count as live data: the garbage collector then lets
// the heap grow by as much again before it runs (GOGC), so the daemon's
// peak RSS grew by about twice the buffers. Mapped memory is resident only
// while a buffer is in use and returns to the system when dropped.
//
// A buffer has one owner at a time: a part being fetched or delivered, or
// the Resolver's free list. Only the free list unmaps, and only buffers it
// holds (dropBuffers), so no fetch can write into an unmapped one.

// newRangeBuf returns a buffer of n bytes, mapped anonymously, or one on
// the Go heap if the mapping fails.
func newRangeBuf(n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return make([]byte, n)
	}
	return b
}

// freeRangeBuf returns b's memory to the system if newRangeBuf mapped it;
// b must not be used after.
func freeRangeBuf(b []byte) {
	if b == nil {
		return
	}
	// munmap fails with EINVAL for memory it did not map (a heap
	// fallback), which the garbage collector then takes.
	_ = unix.Munmap(b[:cap(b)])
}
