package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/containerd/log"

	"github.com/lazylayer/lazylayer/fs/layer"
	"github.com/lazylayer/lazylayer/snapshot"
)

// StatusAddress names the status socket next to the snapshot API socket.
var StatusAddress = layer.StatusAddress

// status serves GET /layers: every layer the daemon holds, as JSON, for
// `lazylayer status`; with ?accessed=1 the files each lazy layer had opened.
type status struct {
	sn     *snapshot.Snapshotter
	layers *layer.Manager
}

func (st *status) list(ctx context.Context, accessed bool) ([]layer.Status, error) {
	held, err := st.sn.Layers(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]layer.Status, 0, len(held))
	for _, l := range held {
		s := layer.Status{Digest: l.Digest, Snapshot: l.Name, State: l.State}
		st.layers.Stat(l.Dir, &s, accessed)
		out = append(out, s)
	}
	return out, nil
}

func (st *status) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/layers" || r.Method != http.MethodGet {
		http.NotFound(w, r)
		return
	}
	layers, err := st.list(r.Context(), r.URL.Query().Get("accessed") != "")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"layers": layers})
}

// serve answers on the unix socket address until the returned stop is
// called.
func (st *status) serve(ctx context.Context, address string) (stop func(), err error) {
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale status socket: %w", err)
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", address, err)
	}
	srv := &http.Server{Handler: st, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.G(ctx).WithError(err).Error("status endpoint stopped")
		}
	}()
	return func() {
		srv.Close()
		os.Remove(address)
	}, nil
}
