package remote

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
)

// Defaults for zero Options fields.
const (
	DefaultRangeSize   = 4 << 20
	DefaultConcurrency = 4
	DefaultRetries     = 4
	DefaultBackoff     = 100 * time.Millisecond
	DefaultTimeout     = 30 * time.Second

	// maxBackoff bounds the wait between two attempts.
	maxBackoff = 10 * time.Second
)

// Options configure registry access. Zero fields take the defaults above.
type Options struct {
	// HostsDir is the root of containerd's hosts.toml directory layout, e.g.
	// /etc/containerd/certs.d. Empty means no host configuration: each
	// registry is reached at its own name (plain HTTP allowed for localhost).
	HostsDir string
	// DockerConfig is the directory holding docker's config.json. Empty means
	// $DOCKER_CONFIG, or ~/.docker when that is unset.
	DockerConfig string
	// Keyring, if not nil, holds credentials handed over at run time (the
	// kubelet's, through the CRI proxy); they go before config.json's.
	Keyring *Keyring
	// RangeSize is the size of one ranged GET in Blob.Stream.
	RangeSize int64
	// Concurrency is the number of parallel ranged GETs of one Blob.Stream.
	// All of a Resolver's streams together hold at most as many ranges
	// (of RangeSize bytes each) in memory.
	Concurrency int
	// Retries is the number of attempts a request gets on transient errors
	// (connection errors, stalls, 429, 5xx), so 1 means no retry.
	Retries int
	// Backoff is the wait before the second attempt; it doubles with each
	// further attempt (with jitter), up to 10s.
	Backoff time.Duration
	// Timeout is how long a request may go without an answer or a byte of
	// body before it is abandoned (and retried).
	Timeout time.Duration
}

func (o Options) withDefaults() Options {
	if o.RangeSize <= 0 {
		o.RangeSize = DefaultRangeSize
	}
	if o.Concurrency <= 0 {
		o.Concurrency = DefaultConcurrency
	}
	if o.Retries <= 0 {
		o.Retries = DefaultRetries
	}
	if o.Backoff <= 0 {
		o.Backoff = DefaultBackoff
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	return o
}

// Resolver fetches manifests and blobs from registries. It is safe for
// concurrent use. It keeps one HTTP client and one authorizer per registry
// name, configured from the hosts directory when that registry is first used
// and again whenever its hosts.toml (or the _default one) changes, as
// containerd reads hosts.toml afresh for every pull.
type Resolver struct {
	opts  Options
	creds *credentialStore

	requests atomic.Int64 // HTTP requests sent to registries (token requests excluded)
	bytes    atomic.Int64 // reply body bytes received

	// authMu serializes Authorizer.Authorize calls: containerd v2.4.2's
	// bearer handler writes a cached token's expiry outside its own lock,
	// racing with concurrent lookups of the same token.
	authMu sync.Mutex

	mu    sync.Mutex            // guards hosts
	hosts map[string]hostConfig // registry name → configured hosts

	// bufs holds the buffers every Blob.Stream of this Resolver fetches
	// ranges into: streamBuffers of them, allocated on first use (nil
	// until then) and reused, so the memory of all streams together is
	// bounded, whatever the number of layers fetched at once.
	bufs    chan []byte
	streams atomic.Int64 // streams open, to drop the buffers when none is
}

// streamBuffers is the number of range buffers all of a Resolver's streams
// share: one stream's Concurrency. More bought no speed on loopback or at
// 100 Mbit/s for a 5-layer image fetched 4 layers at a time, and cost
// memory (docs/benchmarks.md, the full-fetch path).
func (o Options) streamBuffers() int { return o.Concurrency }

// hostConfig is the hosts configured for a registry, in order, and the
// state of the hosts.toml files they came from.
type hostConfig struct {
	hosts   []docker.RegistryHost
	version string
	// transports are the hosts' HTTP transports as configured, before
	// containerd wraps some in its HTTPS-to-HTTP fallback, which cannot
	// close idle connections.
	transports []idleCloser
}

type idleCloser interface{ CloseIdleConnections() }

// idleConnsPerHost is how many connections to one registry host stay open
// between requests. The daemon sends a host many requests at once: each
// layer fetched in full Concurrency ranged GETs, several layers at a time,
// population's, a lazy read's parallel spans. containerd's transport keeps
// Go's default of 2 (and 10 for all hosts), so all but two of a burst's
// connections were closed after each request, and the next burst paid a
// TCP handshake (and TLS's) again on each: a round trip or more a request
// on a link with latency. Idle connections still close after containerd's
// IdleConnTimeout (30 s).
const idleConnsPerHost = 32

// keepIdle makes t keep idleConnsPerHost idle connections a host.
func keepIdle(t *http.Transport) {
	t.MaxIdleConnsPerHost = max(t.MaxIdleConnsPerHost, idleConnsPerHost)
	if t.MaxIdleConns != 0 { // 0: no limit
		t.MaxIdleConns = max(t.MaxIdleConns, 4*idleConnsPerHost)
	}
}

// closeIdle closes the idle connections of hc's transports.
func (hc hostConfig) closeIdle() {
	for _, t := range hc.transports {
		t.CloseIdleConnections()
	}
}

// NewResolver returns a Resolver with opts (zero fields take defaults).
func NewResolver(opts Options) *Resolver {
	opts = opts.withDefaults()
	r := &Resolver{
		opts:  opts,
		creds: newCredentialStore(opts.DockerConfig, opts.Keyring),
		hosts: make(map[string]hostConfig),
		bufs:  make(chan []byte, opts.streamBuffers()),
	}
	for range opts.streamBuffers() {
		r.bufs <- nil
	}
	return r
}

// Stats returns the number of HTTP requests sent to registries and the number
// of reply body bytes received since the Resolver was created.
func (r *Resolver) Stats() (requests, bytes int64) {
	return r.requests.Load(), r.bytes.Load()
}

// CloseIdleConnections closes the idle keep-alive connections of every
// registry client. Requests still work afterwards; they open new connections.
func (r *Resolver) CloseIdleConnections() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, hc := range r.hosts {
		hc.closeIdle()
	}
}

// target is a repository and the hosts that serve it.
type target struct {
	name  string // registry name from the reference, e.g. "docker.io"
	repo  string // repository path, e.g. "library/alpine"
	hosts []docker.RegistryHost
}

// target returns the repository spec names, with the hosts configured for
// its registry that have any of the capabilities in caps, in order.
func (r *Resolver) target(ctx context.Context, spec reference.Spec, caps docker.HostCapabilities) (target, error) {
	name := spec.Hostname()
	repo := strings.TrimPrefix(spec.Locator, name+"/")
	if repo == "" || repo == spec.Locator {
		return target{}, fmt.Errorf("reference %q has no repository: %w", spec.String(), errdefs.ErrInvalidArgument)
	}
	if name == "docker.io" && !strings.Contains(repo, "/") {
		repo = "library/" + repo
	}
	all, err := r.hostsFor(ctx, name)
	if err != nil {
		return target{}, err
	}
	t := target{name: name, repo: repo}
	for _, h := range all {
		if h.Capabilities&caps != 0 {
			t.hosts = append(t.hosts, h)
		}
	}
	if len(t.hosts) == 0 {
		return target{}, fmt.Errorf("no host configured to fetch from %s: %w", name, ErrUnavailable)
	}
	return t, nil
}

// hostsFor returns the hosts configured for the registry name, reading the
// hosts directory the first time and when the files changed.
func (r *Resolver) hostsFor(ctx context.Context, name string) ([]docker.RegistryHost, error) {
	version := r.hostsVersion(name)
	r.mu.Lock()
	defer r.mu.Unlock()
	if hc, ok := r.hosts[name]; ok && hc.version == version {
		return hc.hosts, nil
	}
	var transports []idleCloser
	hostOpts := config.HostOptions{
		Credentials: r.creds.cached,
		// Called with each client ConfigureHosts makes, before it wraps
		// the transport of a host it may reach over plain HTTP.
		UpdateClient: func(c *http.Client) error {
			if t, ok := c.Transport.(*http.Transport); ok {
				keepIdle(t)
			}
			if t, ok := c.Transport.(idleCloser); ok {
				transports = append(transports, t)
			}
			return nil
		},
	}
	if r.opts.HostsDir != "" {
		hostOpts.HostDir = config.HostDirFromRoot(r.opts.HostsDir)
	}
	hosts, err := config.ConfigureHosts(ctx, hostOpts)(name)
	if err != nil {
		return nil, fmt.Errorf("configure hosts for %s (hosts dir %q): %w", name, r.opts.HostsDir, err)
	}
	if old, ok := r.hosts[name]; ok {
		old.closeIdle()
	}
	r.hosts[name] = hostConfig{hosts: hosts, version: version, transports: transports}
	return hosts, nil
}

// hostsVersion is the content of the hosts.toml that configures name, found
// the way containerd finds it (it is small): a change means the hosts must
// be read again. Modification times are too coarse to tell two quick edits
// apart.
func (r *Resolver) hostsVersion(name string) string {
	if r.opts.HostsDir == "" {
		return ""
	}
	dir, err := config.HostDirFromRoot(r.opts.HostsDir)(name)
	if err != nil {
		return ""
	}
	content, err := os.ReadFile(filepath.Join(dir, "hosts.toml"))
	if err != nil {
		return dir
	}
	return dir + "\x00" + string(content)
}

// parseRef parses an image reference such as "127.0.0.1:5000/foo:latest".
func parseRef(ref string) (reference.Spec, error) {
	spec, err := reference.Parse(ref)
	if err != nil {
		return reference.Spec{}, fmt.Errorf("parse reference %q: %w: %w", ref, err, errdefs.ErrInvalidArgument)
	}
	return spec, nil
}
