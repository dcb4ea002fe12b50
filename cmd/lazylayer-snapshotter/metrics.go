package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/lazylayer/lazylayer/cache"
	"github.com/lazylayer/lazylayer/fs/layer"
	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/remote"
)

// metrics are the daemon's Prometheus metrics; docs/metrics.md documents
// each family. The counters and histograms are fed by the fs packages
// (lazy.Metrics, layer.Metrics) and the snapshotter's fallbacks; the
// gauges are read from the daemon's state at each scrape.
type metrics struct {
	reg *prometheus.Registry

	fetched     *prometheus.CounterVec
	readLatency prometheus.Histogram
	fuse        *prometheus.CounterVec
	fallbacks   *prometheus.CounterVec
	throughput  *prometheus.HistogramVec
}

// The on-demand byte counts by mode.
const (
	modeOnDemand   = "on_demand"
	modeBackground = "background"
	modeFull       = "full"
)

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		fetched: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazylayer_fetched_bytes_total",
			Help: "Compressed layer bytes received from registries: on_demand for reads of lazy layers, background for their population, full for plain layers fetched whole.",
		}, []string{"mode"}),
		readLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "lazylayer_on_demand_read_seconds",
			Help:    "Time a FUSE read of data not yet local took (chunk cache or registry).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10), // 100µs .. 26s
		}),
		fuse: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazylayer_fuse_requests_total",
			Help: "Requests the lazy layers' FUSE mounts answered, by opcode.",
		}, []string{"op"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazylayer_fallbacks_total",
			Help: "Layers lazylayer could not obtain, left to containerd's own pull, by reason: not_found, unauthorized, unavailable, other.",
		}, []string{"reason"}),
		throughput: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "lazylayer_full_fetch_throughput_bytes_per_second",
			Help:    "Throughput of each layer fetched whole: mode full for plain layers, background for the population of lazy layers.",
			Buckets: prometheus.ExponentialBuckets(256<<10, 2, 12), // 256KiB/s .. 512MiB/s
		}, []string{"mode"}),
	}
	m.reg.MustRegister(m.fetched, m.readLatency, m.fuse, m.fallbacks, m.throughput,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Every mode and reason is exported from the start, at zero.
	for _, mode := range []string{modeOnDemand, modeBackground, modeFull} {
		m.fetched.WithLabelValues(mode)
	}
	for _, r := range []string{"not_found", "unauthorized", "unavailable", "other"} {
		m.fallbacks.WithLabelValues(r)
	}
	return m
}

var (
	_ lazy.Metrics  = (*metrics)(nil)
	_ layer.Metrics = (*metrics)(nil)
)

// FUSERequest implements lazy.Metrics.
func (m *metrics) FUSERequest(op string) { m.fuse.WithLabelValues(op).Inc() }

// OnDemandRead implements lazy.Metrics.
func (m *metrics) OnDemandRead(d time.Duration) { m.readLatency.Observe(d.Seconds()) }

// Fetched implements lazy.Metrics.
func (m *metrics) Fetched(bytes int64, background bool) {
	mode := modeOnDemand
	if background {
		mode = modeBackground
	}
	m.fetched.WithLabelValues(mode).Add(float64(bytes))
}

// FullFetch implements layer.Metrics.
func (m *metrics) FullFetch(bytes int64, elapsed time.Duration, background bool) {
	mode := modeFull
	if background {
		mode = modeBackground
	} else {
		m.fetched.WithLabelValues(modeFull).Add(float64(bytes))
	}
	if elapsed > 0 {
		m.throughput.WithLabelValues(mode).Observe(float64(bytes) / elapsed.Seconds())
	}
}

// fellBack counts a layer left to containerd's pull, by why.
func (m *metrics) fellBack(err error) {
	reason := "other"
	switch {
	case errors.Is(err, remote.ErrNotFound):
		reason = "not_found"
	case errors.Is(err, remote.ErrUnauthorized):
		reason = "unauthorized"
	case errors.Is(err, remote.ErrUnavailable):
		reason = "unavailable"
	}
	m.fallbacks.WithLabelValues(reason).Inc()
}

// watch registers the gauges read from the daemon's state at each scrape:
// layers by state, population progress, files bound to FUSE (from the
// status report), the chunk cache and the CRI proxy's credentials.
func (m *metrics) watch(report func(context.Context) (layerstatus.Report, error), chunks *cache.Store, keyring *remote.Keyring) {
	m.reg.MustRegister(&layerCollector{report: report})
	if chunks != nil {
		m.reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "lazylayer_chunk_cache_bytes",
				Help: "Bytes of verified chunks the chunk cache holds on disk.",
			}, func() float64 { return float64(chunks.Stats().Bytes) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "lazylayer_chunk_cache_evictions_total",
				Help: "Chunks the chunk cache removed to stay within lazy.cache_size.",
			}, func() float64 { return float64(chunks.Stats().Evictions) }),
		)
	}
	if keyring != nil {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "lazylayer_cri_credentials",
			Help: "Registries the CRI image-service proxy holds unexpired pull credentials for.",
		}, func() float64 { return float64(keyring.Len()) }))
	}
}

// layerCollector reports what the status report knows of the layers.
type layerCollector struct {
	report func(context.Context) (layerstatus.Report, error)
}

var (
	layersDesc = prometheus.NewDesc("lazylayer_layers",
		"Layers the daemon holds, by state: lazy, populating, local, failed.", []string{"state"}, nil)
	boundDesc = prometheus.NewDesc("lazylayer_fuse_bound_files",
		"Files of native lazy layers that running containers still read through FUSE (opened before their data was local).", nil, nil)
	popSizeDesc = prometheus.NewDesc("lazylayer_population_size_bytes",
		"Compressed size of the layers not yet local (lazy, populating or failed).", nil, nil)
	popHeldDesc = prometheus.NewDesc("lazylayer_population_held_bytes",
		"Bytes of the layers not yet local that are held locally: population progress is held over size.", nil, nil)
)

func (c *layerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- layersDesc
	ch <- boundDesc
	ch <- popSizeDesc
	ch <- popHeldDesc
}

func (c *layerCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := c.report(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(layersDesc, err)
		return
	}
	states := map[string]int{layerstatus.StateLazy: 0, layerstatus.StatePopulating: 0, layerstatus.StateLocal: 0, layerstatus.StateFailed: 0}
	var bound, size, held int64
	for _, l := range r.Layers {
		states[l.State]++
		bound += l.FUSEBound
		if l.State != layerstatus.StateLocal {
			size += l.Size
			held += l.Held
		}
	}
	for s, n := range states {
		ch <- prometheus.MustNewConstMetric(layersDesc, prometheus.GaugeValue, float64(n), s)
	}
	ch <- prometheus.MustNewConstMetric(boundDesc, prometheus.GaugeValue, float64(bound))
	ch <- prometheus.MustNewConstMetric(popSizeDesc, prometheus.GaugeValue, float64(size))
	ch <- prometheus.MustNewConstMetric(popHeldDesc, prometheus.GaugeValue, float64(held))
}

// handler answers GET /metrics.
func (m *metrics) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	return mux
}

// serve answers GET /metrics on the TCP address until the returned stop is
// called.
func (m *metrics) serve(ctx context.Context, address string) (stop func(), err error) {
	l, err := net.Listen("tcp", address)
	if err != nil {
		return nil, fmt.Errorf("metrics: listen on %s: %w", address, err)
	}
	srv := &http.Server{Handler: m.handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.G(ctx).WithError(err).Error("metrics endpoint stopped")
		}
	}()
	log.G(ctx).WithField("address", l.Addr().String()).Info("metrics endpoint serving")
	return func() { srv.Close() }, nil
}
