package lazy

import "time"

// Metrics receives what lazy layers do, for the daemon's metrics endpoint.
// Its methods are called on FUSE request paths: implementations must be
// safe for concurrent use and must not block.
type Metrics interface {
	// FUSERequest counts one request a layer's FUSE mount answered; op
	// names its kind ("Lookup", "Open", "Read", ...).
	FUSERequest(op string)
	// OnDemandRead observes how long one FUSE read of data not yet local
	// took (from the chunk cache or the registry).
	OnDemandRead(d time.Duration)
	// Fetched counts compressed bytes received from the registry, for
	// on-demand reads (background false) or population (background true).
	Fetched(bytes int64, background bool)
}

// noMetrics is the Metrics of a layer given none.
type noMetrics struct{}

func (noMetrics) FUSERequest(string)         {}
func (noMetrics) OnDemandRead(time.Duration) {}
func (noMetrics) Fetched(int64, bool)        {}
