// Command lazylayer-snapshotter is lazylayer's daemon: a containerd
// snapshotter served over gRPC on a unix socket, for containerd's
// [proxy_plugins]. See docs/operations.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"

	"github.com/lazylayer/lazylayer/cache"
	"github.com/lazylayer/lazylayer/fs/layer"
	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/fs/lazy"
	"github.com/lazylayer/lazylayer/fs/meta"
	"github.com/lazylayer/lazylayer/remote"
	"github.com/lazylayer/lazylayer/snapshot"
)

func main() {
	if len(os.Args) == 3 && os.Args[1] == holderCommand {
		if err := runHolder(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, "lazylayer-snapshotter fuse-holder:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "lazylayer-snapshotter:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (config, error) {
	cfg := defaultConfig()
	fl := flag.NewFlagSet("lazylayer-snapshotter", flag.ContinueOnError)
	configPath := fl.String("config", "/etc/lazylayer/config.toml", "TOML configuration file (docs/configuration.md)")
	root := fl.String("root", "", "state directory (default "+cfg.Root+")")
	address := fl.String("address", "", "unix socket to serve containerd's snapshot API on (default "+cfg.Address+")")
	hostsDir := fl.String("hosts-dir", "", "containerd hosts.toml directory for registry hosts (default "+cfg.HostsDir+")")
	logLevel := fl.String("log-level", "", "log level: debug, info, warn, error (default "+cfg.LogLevel+")")
	if err := fl.Parse(args); err != nil {
		return cfg, err
	}
	explicit := false
	fl.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "config" })
	if err := cfg.load(*configPath, explicit); err != nil {
		return cfg, err
	}
	for _, o := range []struct{ flag, field *string }{
		{root, &cfg.Root}, {address, &cfg.Address}, {hostsDir, &cfg.HostsDir}, {logLevel, &cfg.LogLevel},
	} {
		if *o.flag != "" {
			*o.field = *o.flag
		}
	}
	return cfg, nil
}

func run(ctx context.Context, args []string) error {
	cfg, err := parseFlags(args)
	if err != nil {
		return err
	}
	if err := log.SetLevel(cfg.LogLevel); err != nil {
		return fmt.Errorf("log level %q: %w", cfg.LogLevel, err)
	}
	// Timestamps to the nanosecond, as containerd's own log has them:
	// the steps of a container's start are milliseconds apart.
	if err := log.SetFormat(log.TextFormat); err != nil {
		return err
	}
	mem, err := parseMemoryLimit(cfg.MemoryLimit)
	if err != nil {
		return err
	}
	if mem.limit > 0 {
		debug.SetMemoryLimit(mem.limit)
	}
	fetch, err := cfg.Fetch.parse()
	if err != nil {
		return err
	}
	lazyOpts, err := cfg.Lazy.parse()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return err
	}
	unlock, err := lockRoot(cfg.Root)
	if err != nil {
		return err
	}
	defer unlock()
	if err := checkOverlayUpper(cfg.Root); err != nil {
		return err
	}
	credTTL, err := cfg.CRI.parse()
	if err != nil {
		return err
	}
	keyring, m := remote.NewKeyring(credTTL), newMetrics()

	resolver := remote.NewResolver(remote.Options{
		HostsDir:    cfg.HostsDir,
		Keyring:     keyring,
		RangeSize:   fetch.rangeSize,
		Concurrency: fetch.concurrency,
		Retries:     fetch.retries,
		Timeout:     fetch.timeout,
	})
	layerCfg := layer.Config{
		Staging:          filepath.Join(cfg.Root, "staging"),
		ConcurrentLayers: fetch.concurrentLayers,
		StagingLimit:     fetch.stagingLimit,
		StagedTTL:        fetch.stagedTTL,
		Metrics:          m,
	}
	var chunks *cache.Store
	// held keeps the FUSE connections of lazy mounts across restarts.
	// Without lazy serving, the connections a daemon serving lazily left
	// are let go below.
	held, err := openHandover(ctx, cfg.Root, lazyOpts.fdStore, lazyOpts.enabled)
	if err != nil {
		return err
	}
	if held != nil {
		defer held.Close()
	}
	if lazyOpts.enabled {
		chunks, err = cache.Open(ctx, filepath.Join(cfg.Root, "cache"), lazyOpts.cacheSize)
		if err != nil {
			return fmt.Errorf("open chunk cache: %w", err)
		}
		defer chunks.Close()
		chunks.SetMemoryBound(mem.chunks)
		passthrough, why := lazy.PassthroughSupport(cfg.Root)
		if !passthrough {
			log.G(ctx).WithField("reason", why).Warn("FUSE passthrough unavailable: local layers of running lazy containers are read through the daemon")
		}
		layerCfg.Lazy = lazy.Options{Cache: chunks, ReadTimeout: lazyOpts.readTimeout, MinRequest: lazyOpts.minRequest,
			Passthrough: passthrough, Activity: new(lazy.Activity), Metrics: m, Handover: held, ProfileDir: lazyOpts.profileDir}
		layerCfg.Populate = lazy.PopulateOptions{Concurrency: lazyOpts.populateConcurrency, RangeSize: lazyOpts.populateRangeSize}
		if lazyOpts.populateBandwidth > 0 {
			layerCfg.Populate.Limit = rate.NewLimiter(rate.Limit(lazyOpts.populateBandwidth), int(min(lazyOpts.populateBandwidth, lazyOpts.populateRangeSize)))
		}
		layerCfg.SwapGrace = lazyOpts.swapGrace
		layerCfg.Policy = lazyOpts.policy
		layerCfg.PopulateDelay = lazyOpts.populateDelay
		if lazyOpts.native {
			if err := meta.Check(ctx, cfg.Root); err != nil {
				log.G(ctx).WithError(err).Warn("native metadata unavailable: containers started lazily read metadata " +
					"through FUSE for their whole life and need the daemon running")
			} else {
				layerCfg.Native = true
				layerCfg.DataDir = filepath.Join(cfg.Root, "d")
			}
		}
	}
	unlockAddr, err := lockAddress(cfg.Address)
	if err != nil {
		return err
	}
	defer unlockAddr()
	layers, err := layer.New(ctx, layer.FromResolver(resolver), layerCfg)
	if err != nil {
		return err
	}
	sn, err := snapshot.New(ctx, cfg.Root, snapshot.WithFileSystem(fileSystem{layers}), snapshot.WithFallbackObserver(m.fellBack))
	if err != nil {
		layers.Close()
		return err
	}
	if held != nil {
		dropUnclaimed(ctx, held)
	}
	// Background population calls into the snapshotter: stop it first.
	defer func() {
		layers.Close()
		sn.Close()
	}()
	st := &status{sn: sn, layers: layers}
	stopSide, err := startSide(ctx, cfg, m, st, chunks, keyring)
	if err != nil {
		return err
	}
	defer stopSide()
	return serve(ctx, cfg.Address, sn, st)
}

// fileSystem adapts the layer Manager to the snapshot package's
// FileSystem: the two packages do not import each other.
type fileSystem struct{ *layer.Manager }

func (f fileSystem) Prepare(ctx context.Context, dir string, parents []string, labels map[string]string) (snapshot.LazyLayer, error) {
	return lazyLayer(f.Manager.Prepare(ctx, dir, parents, labels))
}

func (f fileSystem) Restore(ctx context.Context, dir string, labels map[string]string) (snapshot.LazyLayer, error) {
	return lazyLayer(f.Manager.Restore(ctx, dir, labels))
}

func (f fileSystem) Present(dir string, lazy bool) snapshot.Presentation {
	return snapshot.Presentation(f.Manager.Present(dir, lazy))
}

func (f fileSystem) WaitPresent(ctx context.Context, dir string) error {
	return f.Manager.WaitPresent(ctx, dir)
}

var _ snapshot.NativeFileSystem = fileSystem{}

// lazyLayer keeps a nil *layer.Lazy a nil interface.
func lazyLayer(l *layer.Lazy, err error) (snapshot.LazyLayer, error) {
	if l == nil {
		return nil, err
	}
	return l, err
}

// serve answers containerd's snapshot API on the unix socket address until
// ctx is done, then stops gracefully.
func serve(ctx context.Context, address string, sn *snapshot.Snapshotter, st *status) error {
	// The address lock is held: a socket left here is from a dead instance.
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", address, err)
	}
	defer os.Remove(address)

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	stopStatus, err := st.serve(ctx, layerstatus.Address(address))
	if err != nil {
		srv.Stop()
		return err
	}
	defer stopStatus()
	log.G(ctx).WithField("address", address).WithField("version", version).Info("lazylayer-snapshotter serving")

	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.G(ctx).Info("shutting down")
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		srv.Stop()
	}
	return nil
}
