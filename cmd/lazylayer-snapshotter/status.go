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
	"github.com/opencontainers/go-digest"

	"github.com/lazylayer/lazylayer/fs/layer"
	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/snapshot"
)

// status serves the status socket (see package layerstatus): GET /layers
// lists every layer the daemon holds, for `lazylayer status`; POST
// /populate starts population, for `lazylayer populate`.
type status struct {
	sn     *snapshot.Snapshotter
	layers *layer.Manager
}

func (st *status) report(ctx context.Context, accessed bool) (layerstatus.Report, error) {
	held, err := st.sn.Layers(ctx)
	if err != nil {
		return layerstatus.Report{}, err
	}
	r := layerstatus.Report{Layers: make([]layerstatus.Layer, 0, len(held)), Staging: st.layers.Staging()}
	for _, l := range held {
		s := layerstatus.Layer{Digest: l.Digest, Snapshot: l.Name, State: string(l.State), Error: l.Unavailable}
		st.layers.Stat(l.Dir, &s, accessed)
		r.Layers = append(r.Layers, s)
	}
	return r, nil
}

// populate releases the population of one layer (?layer=DIGEST) or all
// (?all=1); with ?wait=1 it answers once they are local.
func (st *status) populate(r *http.Request) (layerstatus.PopulateResult, int, error) {
	q := r.URL.Query()
	var d digest.Digest
	switch {
	case q.Get("all") != "" && q.Get("layer") == "":
	case q.Get("layer") != "" && q.Get("all") == "":
		var err error
		if d, err = digest.Parse(q.Get("layer")); err != nil {
			return layerstatus.PopulateResult{}, http.StatusBadRequest, fmt.Errorf("layer %q: %w", q.Get("layer"), err)
		}
	default:
		return layerstatus.PopulateResult{}, http.StatusBadRequest, errors.New("name one layer (layer=DIGEST) or all (all=1)")
	}
	res := layerstatus.PopulateResult{Released: st.layers.Populate(d)}
	if d != "" && res.Released == 0 {
		return res, http.StatusNotFound, fmt.Errorf("no lazy layer %s", d)
	}
	if q.Get("wait") != "" {
		if err := st.layers.WaitLocal(r.Context(), d); err != nil {
			res.Error = err.Error()
		}
	}
	return res, http.StatusOK, nil
}

func (st *status) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var (
		out  any
		code = http.StatusOK
		err  error
	)
	switch {
	case r.URL.Path == "/layers" && r.Method == http.MethodGet:
		out, err = st.report(r.Context(), r.URL.Query().Get("accessed") != "")
		if err != nil {
			code = http.StatusInternalServerError
		}
	case r.URL.Path == "/populate" && r.Method == http.MethodPost:
		out, code, err = st.populate(r)
	default:
		http.NotFound(w, r)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), code)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
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
