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
	"os"

	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/lazylayer/lazylayer/script/bench/peers/serve"
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
	return serve.Snapshotter(ctx, srv, sn, address)
}
