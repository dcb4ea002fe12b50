package main

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"sort"
	"time"
)

// results is everything one bench run measured; it is saved as JSON and
// rendered into the report.
type results struct {
	Meta     meta
	Images   []imageInfo
	Profiles []profileInfo
	Modes    []modeInfo
	Samples  []sample
}

// meta describes the machine, the software and the invocation.
type meta struct {
	Date        time.Time
	Duration    time.Duration
	Command     string
	Quick       bool
	Runs        int
	Host        string
	CPU         string
	Cores       int
	MemoryGB    float64
	Kernel      string
	Disk        string // the file system the daemons' state was on; "" before it was recorded (the root's)
	OS          string
	Versions    map[string]string // program → version
	LoadStart   string            // /proc/loadavg when measuring began
	LoadEnd     string
	Fetch       string // lazylayer's fetch settings
	LocalSignal string // how "fully local" was determined for lazylayer
	Notes       []string
}

type imageInfo struct {
	Name          string
	About         string
	Layers        int
	Size          int64 // compressed bytes, gzip image
	ConvertedSize int64
	ConvertedBy   string
	BigFile       string
	BigSize       int64
	Tree          string
	ColdCmd       string
}

type profileInfo struct {
	Name     string
	About    string
	RateMbit int
	RTT      time.Duration
	// Probed through the link before measuring.
	MeasuredMbit float64
	MeasuredRTT  time.Duration
}

type modeInfo struct {
	Name        string
	Snapshotter string
	Tag         string
	About       string
	Held        bool `json:",omitempty"`
}

// sample is one cold run of one image with one mode under one profile.
// Times are seconds from the start of `ctr image pull`.
type sample struct {
	Image, Profile, Mode string
	Run                  int
	Error                string `json:",omitempty"`
	// Busy is the fraction of CPU time others used just before the run.
	Busy float64

	Pull      float64 // pull done
	ColdStart float64 // first output line of the container
	Local     float64 // image fully local
	LocalFrom string  // "status" (lazylayer status after the first output), "status at pull" (the daemon's status socket right after the pull), "pull" (the pull's end) or "released" (a held mode: after the release)

	FirstBytes    int64 // bytes the link delivered to clients before the first output
	FirstRequests int64 // requests the registry side received by then
	FirstConns    int64 // connections the link accepted by then
	LocalBytes    int64 // ... before the image was fully local
	LocalRequests int64

	// Steady holds seconds per steadyKey.
	Steady map[string]float64 `json:",omitempty"`
	// Out holds the number each tree or find command printed (tar's
	// bytes, find's entries), per steadyKey.
	Out map[string]int64 `json:",omitempty"`
	// FUSE holds, for lazylayer, the FUSE requests the daemon's layers
	// answered while each steady-state command ran, per steadyKey; nil
	// when the daemon does not count them (before native metadata).
	FUSE map[string]int64 `json:",omitempty"`
	// NativeLayers is, in a held mode, how many layers the daemon called
	// native while population was held.
	NativeLayers int `json:",omitempty"`
	// FUSEBound is, in a held mode, how many files the running containers
	// held bound to FUSE once every layer was local.
	FUSEBound int64 `json:",omitempty"`
	// Mounts are the lazy mounts of the image's layers (lazylayer modes),
	// in the order the daemon logged them.
	Mounts []lazyMount `json:",omitempty"`
	// Daemons holds each daemon's usage, by name (containerd, lazylayer).
	Daemons map[string]daemonUsage
}

type daemonUsage struct {
	PeakRSS  int64   // VmHWM at the end of the run, bytes
	CPULocal float64 // CPU seconds from pull start until fully local
	CPU      float64 // CPU seconds from pull start to the end of the run
}

// steadyKey names a steady-state measurement: container is "lazy" (the
// one started right after the pull), "held" (the same container in a held
// mode before population was released) or "local" (started once the image
// was local); what is "file" (the largest file), "tree" (tar of the
// image's tree) or "find" (find over the root file system); cache is
// "cold" (caches dropped first) or "warm" (run again right after).
func steadyKey(container, what, cache string) string {
	return container + "/" + what + "/" + cache
}

func loadResults(path string) (*results, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read results: %w", err)
	}
	var r results
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decode results %s: %w", path, err)
	}
	return &r, nil
}

// select returns the successful samples for image, profile and mode.
func (r *results) selectSamples(image, profile, mode string) []sample {
	var out []sample
	for _, s := range r.Samples {
		if s.Image == image && s.Profile == profile && s.Mode == mode && s.Error == "" {
			out = append(out, s)
		}
	}
	return out
}

// failures returns the failed samples.
func (r *results) failures() []sample {
	var out []sample
	for _, s := range r.Samples {
		if s.Error != "" {
			out = append(out, s)
		}
	}
	return out
}

// stat is the median and range of a set of values.
type stat struct {
	N                int
	Median, Min, Max float64
}

func summarize(vals []float64) stat {
	if len(vals) == 0 {
		return stat{}
	}
	v := slices.Clone(vals)
	sort.Float64s(v)
	med := v[len(v)/2]
	if len(v)%2 == 0 {
		med = (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	return stat{N: len(v), Median: med, Min: v[0], Max: v[len(v)-1]}
}

// field summarizes f over samples.
func field(samples []sample, f func(sample) float64) stat {
	var v []float64
	for _, s := range samples {
		v = append(v, f(s))
	}
	return summarize(v)
}
