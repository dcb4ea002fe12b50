package lazy

import (
	"sync"
	"time"
)

// linkEstimate measures the link to the registry from on-demand requests
// as they happen, the way a congestion controller does: the round trip is
// the shortest time until a reply's first byte among the recent requests
// (longer ones waited in a queue), the throughput the highest rate among
// recent replies big enough to show it, counting their time from the
// request less that round trip (a reply's first bytes arrive with its
// header, so the time after the first byte alone overstates the rate).
// Their product, the bandwidth-delay product, is how many more bytes a
// request can carry for the price of one more round trip: the size
// on-demand requests grow to. The zero value knows nothing yet.
type linkEstimate struct {
	mu    sync.Mutex
	rtts  [linkSamples]time.Duration // recent times to the first byte, a ring; guarded by mu
	rates [linkSamples]float64       // recent rates in bytes per second, a ring; guarded by mu
	nrtt  int                        // samples taken into rtts; guarded by mu
	nrate int                        // samples taken into rates; guarded by mu
}

// linkSamples is how many recent requests the estimate remembers.
const linkSamples = 16

// minRateSample is the smallest reply whose transfer time says something
// of the throughput: a smaller one arrives in a few packets with its header.
const minRateSample = 1 << 20

// observe records one request of n bytes whose reply began after
// firstByte and ended after total.
func (e *linkEstimate) observe(firstByte, total time.Duration, n int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rtts[e.nrtt%linkSamples] = firstByte
	e.nrtt++
	transfer := total - e.rtt()
	if n < minRateSample || transfer <= 0 {
		return
	}
	e.rates[e.nrate%linkSamples] = float64(n) / transfer.Seconds()
	e.nrate++
}

// rtt returns the shortest recent time to the first byte. Caller holds mu.
func (e *linkEstimate) rtt() time.Duration {
	rtt := e.rtts[0]
	for _, r := range e.rtts[:min(e.nrtt, linkSamples)] {
		rtt = min(rtt, r)
	}
	return rtt
}

// bdp returns the bandwidth-delay product, bounded by lo and hi; lo until
// both round trip and throughput have been measured.
func (e *linkEstimate) bdp(lo, hi int64) int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.nrtt == 0 || e.nrate == 0 {
		return lo
	}
	rtt := e.rtt()
	var bw float64
	for _, r := range e.rates[:min(e.nrate, linkSamples)] {
		bw = max(bw, r)
	}
	return min(max(int64(bw*rtt.Seconds()), lo), hi)
}
