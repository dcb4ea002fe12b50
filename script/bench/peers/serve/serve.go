// Package serve runs a peer snapshotter's gRPC server for the benchmark:
// the part the peers' daemons share once their snapshotter is built. It is
// not a daemon framework; each peer's main builds its own snapshotter.
package serve

import (
	"context"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"google.golang.org/grpc"
)

// Snapshotter serves sn as a containerd proxy snapshotter on the unix
// socket address (replacing a stale socket file) with srv, until SIGINT or
// SIGTERM, which stop the server and return nil, or until serving fails.
func Snapshotter(ctx context.Context, srv *grpc.Server, sn snapshots.Snapshotter, address string) error {
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
	defer signal.Stop(sig)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case s := <-sig:
		log.G(ctx).Infof("got %v, stopping", s)
		srv.Stop()
		<-errc
		return nil
	case err := <-errc:
		return err
	}
}
