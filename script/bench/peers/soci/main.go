// Command soci is soci-snapshotter's daemon (soci-snapshotter-grpc) for the
// benchmark, wired from the library packages of the release the Go module
// proxy serves: its cmd module is not served. It serves the snapshotter on
// a unix socket as a containerd proxy plugin with the daemon's documented
// default configuration (config.NewConfig: SOCI index manifest v2 only,
// containerd's content store, bbolt metadata store under -root, background
// fetch on); -config may add settings, as the daemon's config.toml does —
// the benchmark sets only containerd's address.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/awslabs/soci-snapshotter/config"
	socifs "github.com/awslabs/soci-snapshotter/fs"
	"github.com/awslabs/soci-snapshotter/metadata"
	"github.com/awslabs/soci-snapshotter/service"
	"github.com/awslabs/soci-snapshotter/ztoc"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"github.com/lazylayer/lazylayer/script/bench/peers/serve"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", config.DefaultSociSnapshotterRootPath, "state directory")
	address := flag.String("address", "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock", "unix socket to serve on")
	configPath := flag.String("config", config.DefaultConfigPath, "configuration file (TOML)")
	logLevel := flag.String("log-level", "info", "log level")
	flag.Parse()
	if err := run(*root, *address, *configPath, *logLevel); err != nil {
		fmt.Fprintln(os.Stderr, "soci:", err)
		os.Exit(1)
	}
}

func run(root, address, configPath, logLevel string) error {
	if err := log.SetLevel(logLevel); err != nil {
		return err
	}
	ctx := log.WithLogger(context.Background(), log.L)
	cfg, err := config.NewConfigFromToml(configPath)
	if err != nil {
		return err
	}
	if !cfg.SkipCheckSnapshotterSupported {
		if err := service.Supported(root); err != nil {
			return fmt.Errorf("snapshotter not supported: %w", err)
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}
	// The daemon's metadata store: bbolt, as its "db" store type.
	db, err := bolt.Open(filepath.Join(root, "metadata.db"), 0o600, &bolt.Options{
		NoFreelistSync: true, InitialMmapSize: 64 << 20, FreelistType: bolt.FreelistMapType,
	})
	if err != nil {
		return err
	}
	defer db.Close()
	store := func(sr *io.SectionReader, toc ztoc.TOC, opts ...metadata.Option) (metadata.Reader, error) {
		return metadata.NewReader(db, sr, toc, opts...)
	}
	sn, err := service.NewSociSnapshotterService(ctx, root, &cfg.ServiceConfig,
		service.WithFilesystemOptions(socifs.WithMetadataStore(store)))
	if err != nil {
		return err
	}
	defer sn.Close()
	// The snapshotter reaches containerd's content store in the namespace
	// of the request it serves: carry the caller's namespace from the
	// incoming metadata to the outgoing, as the daemon does.
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if ns, ok := namespaces.Namespace(ctx); ok {
			ctx = namespaces.WithNamespace(ctx, ns)
		}
		return h(ctx, req)
	}))
	return serve.Snapshotter(ctx, srv, sn, address)
}
