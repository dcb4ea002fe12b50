// Command stargz is stargz-snapshotter's daemon (containerd-stargz-grpc) for
// the benchmark, wired from the library packages of the release the Go
// module proxy serves: its cmd module is not served. It serves the
// snapshotter on a unix socket as a containerd proxy plugin, with the
// daemon's documented default configuration (an empty config.toml: no
// keychains, the registry reached directly, memory metadata store, FUSE
// manager off) unless -config names a file.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/pelletier/go-toml/v2"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory")
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve on")
	configPath := flag.String("config", "", "configuration file (TOML); none: the defaults")
	logLevel := flag.String("log-level", "info", "log level")
	flag.Parse()
	if err := run(*root, *address, *configPath, *logLevel); err != nil {
		fmt.Fprintln(os.Stderr, "stargz:", err)
		os.Exit(1)
	}
}

func run(root, address, configPath, logLevel string) error {
	if err := log.SetLevel(logLevel); err != nil {
		return err
	}
	ctx := log.WithLogger(context.Background(), log.L)
	var cfg service.Config
	if configPath != "" {
		b, err := os.ReadFile(configPath)
		if err != nil {
			return err
		}
		if err := toml.Unmarshal(b, &cfg); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	}
	sn, err := service.NewStargzSnapshotterService(ctx, root, &cfg)
	if err != nil {
		return err
	}
	defer sn.Close()
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.RemoveAll(address); err != nil {
		return err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case s := <-sig:
		log.G(ctx).Infof("got %v, stopping", s)
		srv.Stop()
		return nil
	case err := <-errc:
		return err
	}
}
