package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lazylayer/lazylayer/cache"
	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/remote"
)

// families are the metric families docs/metrics.md documents.
var families = []string{
	"lazylayer_layers",
	"lazylayer_fetched_bytes_total",
	"lazylayer_on_demand_read_seconds",
	"lazylayer_fuse_requests_total",
	"lazylayer_fuse_bound_files",
	"lazylayer_population_size_bytes",
	"lazylayer_population_held_bytes",
	"lazylayer_full_fetch_throughput_bytes_per_second",
	"lazylayer_chunk_cache_bytes",
	"lazylayer_chunk_cache_evictions_total",
	"lazylayer_fallbacks_total",
	"lazylayer_cri_credentials",
}

// TestMetrics: the endpoint exports every documented family, with the
// values the hooks and the daemon's state give, and docs/metrics.md
// documents every lazylayer family the endpoint exports.
func TestMetrics(t *testing.T) {
	m := newMetrics()
	chunks, err := cache.Open(t.Context(), t.TempDir(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer chunks.Close()
	keyring := remote.NewKeyring(time.Hour)
	keyring.Put("r.example", "u", "p")
	report := func(context.Context) (layerstatus.Report, error) {
		return layerstatus.Report{Layers: []layerstatus.Layer{
			{State: layerstatus.StateLazy, Size: 1000, Held: 250, FUSEBound: 2},
			{State: layerstatus.StatePopulating, Size: 3000, Held: 750, FUSEBound: 1},
			{State: layerstatus.StateLocal, Size: 5000, Held: 5000},
		}}, nil
	}
	m.watch(report, chunks, keyring)
	m.FUSERequest("Open")
	m.FUSERequest("Open")
	m.FUSERequest("Read")
	m.Fetched(100, false)
	m.Fetched(400, true)
	m.OnDemandRead(3 * time.Millisecond)
	m.FullFetch(4<<20, time.Second, false)
	m.FullFetch(2<<20, time.Second, true)
	m.fellBack(fmt.Errorf("fetch: %w", remote.ErrNotFound))
	m.fellBack(fmt.Errorf("fetch: %w", remote.ErrUnavailable))
	m.fellBack(fmt.Errorf("fetch: %w", errors2(remote.ErrUnavailable, remote.ErrUnauthorized)))
	m.fellBack(fmt.Errorf("mount: no FUSE"))

	srv := httptest.NewServer(m.handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	for _, want := range []string{
		`lazylayer_layers{state="lazy"} 1`,
		`lazylayer_layers{state="populating"} 1`,
		`lazylayer_layers{state="local"} 1`,
		`lazylayer_layers{state="failed"} 0`,
		`lazylayer_fuse_bound_files 3`,
		`lazylayer_population_size_bytes 4000`,
		`lazylayer_population_held_bytes 1000`,
		`lazylayer_fuse_requests_total{op="Open"} 2`,
		`lazylayer_fuse_requests_total{op="Read"} 1`,
		`lazylayer_fetched_bytes_total{mode="on_demand"} 100`,
		`lazylayer_fetched_bytes_total{mode="background"} 400`,
		`lazylayer_fetched_bytes_total{mode="full"} 4.194304e+06`,
		`lazylayer_on_demand_read_seconds_count 1`,
		`lazylayer_full_fetch_throughput_bytes_per_second_count{mode="full"} 1`,
		`lazylayer_full_fetch_throughput_bytes_per_second_count{mode="background"} 1`,
		`lazylayer_fallbacks_total{reason="not_found"} 1`,
		`lazylayer_fallbacks_total{reason="unavailable"} 1`,
		`lazylayer_fallbacks_total{reason="unauthorized"} 1`,
		`lazylayer_fallbacks_total{reason="other"} 1`,
		`lazylayer_chunk_cache_bytes 0`,
		`lazylayer_chunk_cache_evictions_total 0`,
		`lazylayer_cri_credentials 1`,
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	exported := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		if name, ok := strings.CutPrefix(line, "# TYPE "); ok {
			exported[strings.Fields(name)[0]] = true
		}
	}
	for _, f := range families {
		if !exported[f] {
			t.Errorf("/metrics lacks the family %s", f)
		}
	}
	doc, err := os.ReadFile("../../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	documented := regexp.MustCompile("`(lazylayer_[a-z_]+)`").FindAllStringSubmatch(string(doc), -1)
	var names []string
	for _, d := range documented {
		names = append(names, d[1])
	}
	for f := range exported {
		if strings.HasPrefix(f, "lazylayer_") && !slices.Contains(names, f) {
			t.Errorf("docs/metrics.md does not document %s", f)
		}
	}
}

// errors2 is an error that is both a and b, as remote's errors for a 401
// are (ErrUnavailable and ErrUnauthorized).
func errors2(a, b error) error { return fmt.Errorf("%w: %w", a, b) }
