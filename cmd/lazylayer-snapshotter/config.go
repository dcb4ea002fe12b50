package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/pelletier/go-toml/v2"

	"github.com/lazylayer/lazylayer/fs/layer"
)

// config is the daemon's configuration: the TOML file given with --config,
// then flags on top. docs/configuration.md documents every field.
type config struct {
	Root     string `toml:"root"`
	Address  string `toml:"address"`
	HostsDir string `toml:"hosts_dir"`
	LogLevel string `toml:"log_level"`
	// MetricsAddress is the TCP address ("127.0.0.1:9101") of the
	// Prometheus endpoint (GET /metrics); empty turns it off.
	MetricsAddress string `toml:"metrics_address"`
	// MemoryLimit is the soft limit of the daemon's Go memory, e.g.
	// "48MiB" (runtime/debug.SetMemoryLimit); "0" sets none.
	MemoryLimit string      `toml:"memory_limit"`
	Fetch       fetchConfig `toml:"fetch"`
	Lazy        lazyConfig  `toml:"lazy"`
	CRI         criConfig   `toml:"cri"`
}

// criConfig sets up the CRI image-service proxy (docs/kubernetes.md).
type criConfig struct {
	// Address is the unix socket the proxy serves CRI's image service on,
	// for the kubelet's --image-service-endpoint; empty turns it off.
	Address string `toml:"address"`
	// ContainerdAddress is containerd's socket, where every call goes on.
	ContainerdAddress string `toml:"containerd_address"`
	// CredentialTTL is how long the credentials of a pull are kept after
	// the kubelet last sent them, e.g. "12h".
	CredentialTTL string `toml:"credential_ttl"`
}

// parse checks the CRI settings and returns the credential lifetime.
func (c criConfig) parse() (time.Duration, error) {
	ttl, err := time.ParseDuration(c.CredentialTTL)
	if err != nil || ttl <= 0 {
		return 0, fmt.Errorf("cri.credential_ttl %q: want a duration such as 12h", c.CredentialTTL)
	}
	if c.Address != "" && c.ContainerdAddress == "" {
		return 0, errors.New("cri.containerd_address must name containerd's socket when cri.address is set")
	}
	return ttl, nil
}

type lazyConfig struct {
	// Enabled serves eStargz and zstd:chunked layers lazily over FUSE.
	Enabled bool `toml:"enabled"`
	// CacheSize bounds the chunk cache under root/cache, e.g. "10GiB".
	CacheSize string `toml:"cache_size"`
	// ReadTimeout is how long a read waits for an unavailable registry
	// before it fails with EIO, e.g. "30s".
	ReadTimeout string `toml:"read_timeout"`
	// MinRequest is how much of the blob an on-demand request covers at
	// least, e.g. "64KiB": the files after the one read come along. "0"
	// fetches only what reads need.
	MinRequest string `toml:"min_request"`
	// Populate says when lazy layers download in the background until
	// they are local: "auto" (at the mount, after populate_delay if set,
	// yielding to pulls and on-demand reads) or "manual"
	// (when `lazylayer populate` says). true and false, from earlier
	// versions, mean "auto" and "manual".
	Populate any `toml:"populate"`
	// PopulateDelay is how long after a layer is mounted its background
	// download may start under "auto", e.g. "1s"; "0" (the default) lets
	// it start at once. Either way it waits while images are pulled and
	// containers read lazily.
	PopulateDelay string `toml:"populate_delay"`
	// PopulateConcurrency is the number of ranged requests in flight per
	// layer while it downloads in the background.
	PopulateConcurrency int `toml:"populate_concurrency"`
	// PopulateRangeSize is the size of one background request, e.g.
	// "1MiB".
	PopulateRangeSize string `toml:"populate_range_size"`
	// PopulateBandwidth bounds background downloads per layer, e.g.
	// "50MiB" (per second); "0" means no bound. On-demand reads are never
	// bounded and always go first.
	PopulateBandwidth string `toml:"populate_bandwidth"`
	// SwapGrace is how long a layer's FUSE mount stays attached after the
	// layer turned local, e.g. "30s".
	SwapGrace string `toml:"swap_grace"`
	// NativeMetadata presents lazy layers to overlay as metadata trees
	// over data-only layers, so that containers started lazily read
	// metadata natively and file data natively once it is local: "auto"
	// (when the kernel and the root's file system allow it, checked at
	// start) or "off".
	NativeMetadata string `toml:"native_metadata"`
	// FDStore says where the FUSE connections of lazy mounts are kept so
	// that containers outlive a crash of the daemon: "auto" (systemd's
	// file descriptor store when systemd says it is enabled, else the
	// holder process), "systemd" (the store whenever run by systemd) or
	// "holder".
	FDStore string `toml:"fd_store"`
	// ProfileDir is a directory of access profiles (`lazylayer profile
	// save` writes them, one file per layer): a lazy layer whose profile
	// is there fetches the files it names during the pull, as soon as
	// its TOC is read. "" (the default) reads none.
	ProfileDir string `toml:"profile_dir"`
}

type fetchConfig struct {
	// RangeSize is the size of one ranged GET, e.g. "4MiB".
	RangeSize string `toml:"range_size"`
	// Concurrency is the number of ranged GETs in flight per layer.
	Concurrency int `toml:"concurrency"`
	// Retries is the number of attempts per request.
	Retries int `toml:"retries"`
	// Timeout bounds a request that makes no progress, e.g. "30s".
	Timeout string `toml:"timeout"`
	// ConcurrentLayers is the number of layers fetched ahead at once.
	ConcurrentLayers int `toml:"concurrent_layers"`
	// StagingLimit bounds the compressed size of the layers fetched ahead
	// of containerd's requests and not yet claimed, e.g. "2GiB".
	StagingLimit string `toml:"staging_limit"`
	// StagedTTL is how long a layer fetched ahead waits for containerd to
	// ask for it before it is deleted, e.g. "2m".
	StagedTTL string `toml:"staged_ttl"`
}

func defaultConfig() config {
	return config{
		Root:     "/var/lib/lazylayer",
		Address:  "/run/lazylayer/lazylayer.sock",
		HostsDir: "/etc/containerd/certs.d",
		LogLevel: "info",
		// With the code's resident pages (12–20 MB), 64 MiB of RSS
		// while the live data fits (docs/operations.md#memory).
		MemoryLimit: "48MiB",
		Fetch: fetchConfig{
			RangeSize:        "4MiB",
			Concurrency:      4,
			Retries:          4,
			Timeout:          "30s",
			ConcurrentLayers: 3,
			StagingLimit:     "2GiB",
			StagedTTL:        "2m",
		},
		Lazy: lazyConfig{
			Enabled:             true,
			CacheSize:           "10GiB",
			ReadTimeout:         "30s",
			MinRequest:          "64KiB",
			Populate:            "auto",
			PopulateDelay:       "0s",
			PopulateConcurrency: 4,
			PopulateRangeSize:   "1MiB",
			PopulateBandwidth:   "0",
			SwapGrace:           "30s",
			NativeMetadata:      "auto",
			FDStore:             "auto",
		},
		CRI: criConfig{
			ContainerdAddress: "/run/containerd/containerd.sock",
			CredentialTTL:     "12h",
		},
	}
}

// load reads path over the defaults. A missing file is an error only when
// the user named it.
func (c *config) load(path string, explicit bool) error {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && !explicit {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		var serr *toml.StrictMissingError
		if errors.As(err, &serr) {
			var keys []string
			for _, e := range serr.Errors {
				keys = append(keys, strings.Join(e.Key(), "."))
			}
			return fmt.Errorf("config %s: unknown setting %s", path, strings.Join(keys, ", "))
		}
		var derr *toml.DecodeError
		if errors.As(err, &derr) {
			row, col := derr.Position()
			return fmt.Errorf("config %s:%d:%d: %w", path, row, col, err)
		}
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// memoryBudget is what the daemon's memory limit bounds.
type memoryBudget struct {
	// limit is the soft limit of the Go runtime's memory; 0: none.
	limit int64
	// chunks bounds the chunks the chunk cache keeps in memory while it
	// cannot write them: a quarter of limit (64 MiB without a limit).
	chunks int64
}

// minMemoryLimit is the smallest memory limit accepted: below it the
// daemon would spend its time collecting garbage.
const minMemoryLimit = 16 << 20

func parseMemoryLimit(s string) (memoryBudget, error) {
	n, err := units.RAMInBytes(s)
	if err != nil || n < 0 || (n > 0 && n < minMemoryLimit) {
		return memoryBudget{}, fmt.Errorf("memory_limit %q: want 0 or a size of at least 16MiB", s)
	}
	if n == 0 {
		return memoryBudget{chunks: 64 << 20}, nil
	}
	return memoryBudget{limit: n, chunks: n / 4}, nil
}

// fetchOptions are the parsed fetch settings.
type fetchOptions struct {
	rangeSize        int64
	concurrency      int
	retries          int
	timeout          time.Duration
	concurrentLayers int
	stagingLimit     int64
	stagedTTL        time.Duration
}

func (f fetchConfig) parse() (fetchOptions, error) {
	rs, err := units.RAMInBytes(f.RangeSize)
	if err != nil || rs < 64<<10 {
		return fetchOptions{}, fmt.Errorf("fetch.range_size %q: want a size of at least 64KiB", f.RangeSize)
	}
	to, err := time.ParseDuration(f.Timeout)
	if err != nil || to <= 0 {
		return fetchOptions{}, fmt.Errorf("fetch.timeout %q: want a duration such as 30s", f.Timeout)
	}
	if f.Concurrency < 1 || f.Retries < 1 || f.ConcurrentLayers < 1 {
		return fetchOptions{}, errors.New("fetch.concurrency, fetch.retries and fetch.concurrent_layers must be at least 1")
	}
	limit, err := units.RAMInBytes(f.StagingLimit)
	if err != nil || limit < 0 {
		return fetchOptions{}, fmt.Errorf("fetch.staging_limit %q: want a size such as 2GiB, or 0 to fetch no layer ahead", f.StagingLimit)
	}
	ttl, err := time.ParseDuration(f.StagedTTL)
	if err != nil || ttl <= 0 {
		return fetchOptions{}, fmt.Errorf("fetch.staged_ttl %q: want a duration such as 2m", f.StagedTTL)
	}
	return fetchOptions{rangeSize: rs, concurrency: f.Concurrency, retries: f.Retries, timeout: to,
		concurrentLayers: f.ConcurrentLayers, stagingLimit: limit, stagedTTL: ttl}, nil
}

type lazyOptions struct {
	enabled             bool
	cacheSize           int64
	readTimeout         time.Duration
	minRequest          int64 // -1: none
	policy              layer.Policy
	populateDelay       time.Duration
	populateConcurrency int
	populateRangeSize   int64
	populateBandwidth   int64 // bytes per second; 0 unbounded
	swapGrace           time.Duration
	native              bool
	fdStore             string // auto, systemd or holder
	profileDir          string // "" for none
}

func (l lazyConfig) parse() (lazyOptions, error) {
	size, err := units.RAMInBytes(l.CacheSize)
	if err != nil || size < 0 {
		return lazyOptions{}, fmt.Errorf("lazy.cache_size %q: want a size such as 10GiB", l.CacheSize)
	}
	to, err := time.ParseDuration(l.ReadTimeout)
	if err != nil || to <= 0 {
		return lazyOptions{}, fmt.Errorf("lazy.read_timeout %q: want a duration such as 30s", l.ReadTimeout)
	}
	minReq, err := units.RAMInBytes(l.MinRequest)
	if err != nil || minReq < 0 {
		return lazyOptions{}, fmt.Errorf("lazy.min_request %q: want a size such as 64KiB, or 0", l.MinRequest)
	}
	if minReq == 0 {
		minReq = -1
	}
	popRange, err := units.RAMInBytes(l.PopulateRangeSize)
	if err != nil || popRange < 64<<10 {
		return lazyOptions{}, fmt.Errorf("lazy.populate_range_size %q: want a size of at least 64KiB", l.PopulateRangeSize)
	}
	bw, err := units.RAMInBytes(l.PopulateBandwidth)
	if err != nil || bw < 0 {
		return lazyOptions{}, fmt.Errorf("lazy.populate_bandwidth %q: want a size per second such as 50MiB, or 0", l.PopulateBandwidth)
	}
	grace, err := time.ParseDuration(l.SwapGrace)
	if err != nil || grace <= 0 {
		return lazyOptions{}, fmt.Errorf("lazy.swap_grace %q: want a duration such as 30s", l.SwapGrace)
	}
	delay, err := time.ParseDuration(l.PopulateDelay)
	if err != nil || delay < 0 {
		return lazyOptions{}, fmt.Errorf("lazy.populate_delay %q: want a duration such as 1s", l.PopulateDelay)
	}
	policy, err := parsePolicy(l.Populate)
	if err != nil {
		return lazyOptions{}, err
	}
	if l.PopulateConcurrency < 1 {
		return lazyOptions{}, errors.New("lazy.populate_concurrency must be at least 1")
	}
	var native bool
	switch l.NativeMetadata {
	case "auto", "":
		native = true
	case "off":
	default:
		return lazyOptions{}, fmt.Errorf("lazy.native_metadata %q: want \"auto\" or \"off\"", l.NativeMetadata)
	}
	switch l.FDStore {
	case "auto", "systemd", "holder":
	case "":
		l.FDStore = "auto"
	default:
		return lazyOptions{}, fmt.Errorf("lazy.fd_store %q: want \"auto\", \"systemd\" or \"holder\"", l.FDStore)
	}
	if l.ProfileDir != "" && !filepath.IsAbs(l.ProfileDir) {
		return lazyOptions{}, fmt.Errorf("lazy.profile_dir %q: want an absolute path", l.ProfileDir)
	}
	return lazyOptions{profileDir: l.ProfileDir, fdStore: l.FDStore, enabled: l.Enabled, cacheSize: size, readTimeout: to, minRequest: minReq, populateConcurrency: l.PopulateConcurrency,
		populateRangeSize: popRange,
		policy:            policy, populateDelay: delay, populateBandwidth: bw, swapGrace: grace, native: native}, nil
}

// parsePolicy reads lazy.populate: "auto" or "manual", or a boolean as
// earlier versions wrote it.
func parsePolicy(v any) (layer.Policy, error) {
	switch v {
	case "auto", true:
		return layer.PolicyAuto, nil
	case "manual", false:
		return layer.PolicyManual, nil
	}
	return 0, fmt.Errorf("lazy.populate %v: want \"auto\" or \"manual\"", v)
}
