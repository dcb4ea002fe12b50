package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazylayer/lazylayer/cache"
	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/remote"
	"github.com/lazylayer/lazylayer/remote/criproxy"
)

// startSide starts what runs beside the snapshotter, each when its address
// is configured: the Prometheus endpoint and the CRI image-service proxy
// (which records pull credentials in keyring). stop stops them.
func startSide(ctx context.Context, cfg config, m *metrics, st *status, chunks *cache.Store, keyring *remote.Keyring) (stop func(), err error) {
	var stops []func()
	stop = func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	if cfg.MetricsAddress != "" {
		if cfg.CRI.Address == "" {
			keyring = nil // no proxy: no credentials gauge
		}
		m.watch(func(ctx context.Context) (layerstatus.Report, error) { return st.report(ctx, false) }, chunks, keyring)
		s, err := m.serve(ctx, cfg.MetricsAddress)
		if err != nil {
			return nil, err
		}
		stops = append(stops, s)
	}
	if cfg.CRI.Address != "" {
		s, err := serveCRI(ctx, cfg.CRI, keyring)
		if err != nil {
			stop()
			return nil, err
		}
		stops = append(stops, s)
	}
	return stop, nil
}

// serveCRI serves the CRI image-service proxy on c.Address, forwarding to
// containerd at c.ContainerdAddress.
func serveCRI(ctx context.Context, c criConfig, keyring *remote.Keyring) (stop func(), err error) {
	conn, err := grpc.NewClient("unix://"+c.ContainerdAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("cri: containerd at %s: %w", c.ContainerdAddress, err)
	}
	if err := os.MkdirAll(filepath.Dir(c.Address), 0o700); err != nil {
		conn.Close()
		return nil, fmt.Errorf("cri: %w", err)
	}
	// The snapshotter's address lock is held: a socket left here is from a
	// dead instance.
	if err := os.Remove(c.Address); err != nil && !errors.Is(err, os.ErrNotExist) {
		conn.Close()
		return nil, fmt.Errorf("cri: remove stale socket: %w", err)
	}
	l, err := net.Listen("unix", c.Address)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("cri: listen on %s: %w", c.Address, err)
	}
	// Pull requests carry credentials: only root talks to this socket.
	if err := os.Chmod(c.Address, 0o600); err != nil {
		l.Close()
		conn.Close()
		return nil, fmt.Errorf("cri: %w", err)
	}
	srv := grpc.NewServer()
	criproxy.New(conn, keyring).Register(srv)
	go func() {
		if err := srv.Serve(l); err != nil {
			log.G(ctx).WithError(err).Error("CRI image-service proxy stopped")
		}
	}()
	log.G(ctx).WithField("address", c.Address).WithField("containerd", c.ContainerdAddress).
		Info("CRI image-service proxy serving")
	return func() {
		done := make(chan struct{})
		go func() { srv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			srv.Stop()
		}
		conn.Close()
		os.Remove(c.Address)
	}, nil
}
