// Package layerstatus is the wire format of lazylayer-snapshotter's status
// socket, shared by the daemon (fs/layer fills it) and the lazylayer CLI.
// It is plain data and a small client: it links neither FUSE nor the
// snapshotter, so the CLI stays small.
//
// The socket (status.sock, next to the snapshot API socket) answers HTTP:
//
//	GET  /layers[?accessed=1]                   Report
//	POST /populate?layer=DIGEST|all=1[&wait=1]  PopulateResult
package layerstatus

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
)

// Address is the status socket of the daemon whose snapshot API is at
// address.
func Address(address string) string {
	return filepath.Join(filepath.Dir(address), "status.sock")
}

// The states a layer is reported in.
const (
	StateLazy       = "lazy"       // served on demand
	StatePopulating = "populating" // downloading in the background
	StateLocal      = "local"      // a complete, verified local tree
	StateFailed     = "failed"     // population gave up; still served lazily
)

// Layer is what the daemon reports of one layer it holds.
type Layer struct {
	Digest   string  `json:"digest"`
	Snapshot string  `json:"snapshot"`
	State    string  `json:"state"` // StateLazy, StatePopulating, StateLocal or StateFailed
	Size     int64   `json:"size"`  // compressed size of the blob, when known
	Fetched  int64   `json:"fetched"`
	Held     int64   `json:"held"`              // bytes of the blob held locally
	Rate     float64 `json:"rate,omitempty"`    // population's bytes per second
	Requests int64   `json:"requests"`          // on-demand ranged requests
	Reads    int64   `json:"reads"`             // FUSE reads served
	Entries  int     `json:"entries,omitempty"` // inodes of a lazy layer
	// View is, for a layer with a FUSE mount, "exact" when its lazy view
	// comes from a verified exact record, or "approximate: <why>" when it
	// is the TOC's (names that are not UTF-8 and sub-second mtimes not as
	// an extraction gives them).
	View string `json:"view,omitempty"`
	// HeldBack is true while the layer waits for `lazylayer populate`
	// (the manual population policy).
	HeldBack   bool   `json:"held_back,omitempty"`
	Error      string `json:"error,omitempty"` // why population gave up, or why the layer is unavailable
	Mountpoint string `json:"mountpoint,omitempty"`
	Users      int    `json:"users"` // overlays using the FUSE mount
	// Native is true when containers see the layer through its metadata
	// tree (native metadata: lookups, stat and readdir never reach the
	// daemon) and the FUSE mount only serves file data not yet local.
	Native bool `json:"native,omitempty"`
	// FUSERequests counts the requests the layer's FUSE mount answered,
	// of every kind (lookup, getattr, readdir, open, read, ...).
	FUSERequests int64 `json:"fuse_requests"`
	// FUSEBound is, for a native layer, how many of its files running
	// containers hold bound to the FUSE mount: files first opened before
	// their data was local. They read through FUSE (passthrough once
	// local) until the kernel evicts them, and a crash of the daemon
	// breaks their reads; every other file reads natively.
	FUSEBound int64 `json:"fuse_bound"`
	// Accessed lists the files opened while the layer was lazy, in
	// first-open order; only when asked for.
	Accessed []string `json:"accessed,omitempty"`
	// TOC is the digest of a lazy layer's TOC, as the manifest gives it:
	// with Digest, the key of the layer's access profile.
	TOC string `json:"toc,omitempty"`
}

// Staging is what layers fetched ahead of containerd's requests hold.
type Staging struct {
	Layers   int   `json:"layers"`   // fetched or being fetched, not yet claimed
	Reserved int64 `json:"reserved"` // their compressed sizes, counted against Limit
	Bytes    int64 `json:"bytes"`    // what the fetched ones take on disk
	Limit    int64 `json:"limit"`
}

// Report is the answer to GET /layers.
type Report struct {
	Layers  []Layer `json:"layers"`
	Staging Staging `json:"staging"`
}

// PopulateResult is the answer to POST /populate.
type PopulateResult struct {
	Released int    `json:"released"`        // layers whose population was started
	Error    string `json:"error,omitempty"` // with wait: why a layer did not turn local
}

// Client talks to a daemon's status socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the status socket socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket, http: &http.Client{
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}}
}

// Layers asks for the daemon's layers; with accessed, the files each lazy
// layer had opened.
func (c *Client) Layers(ctx context.Context, accessed bool) (Report, error) {
	q := url.Values{}
	if accessed {
		q.Set("accessed", "1")
	}
	var r Report
	err := c.do(ctx, http.MethodGet, "/layers", q, &r)
	return r, err
}

// Populate starts the population of the layer dgst, or of every lazy layer
// when dgst is empty; with wait it returns once they are local.
func (c *Client) Populate(ctx context.Context, dgst string, wait bool) (PopulateResult, error) {
	q := url.Values{}
	if dgst == "" {
		q.Set("all", "1")
	} else {
		q.Set("layer", dgst)
	}
	if wait {
		q.Set("wait", "1")
	}
	var r PopulateResult
	err := c.do(ctx, http.MethodPost, "/populate", q, &r)
	return r, err
}

func (c *Client) do(ctx context.Context, method, path string, q url.Values, out any) error {
	u := "http://lazylayer" + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("ask the daemon at %s (is lazylayer-snapshotter running?): %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("daemon at %s answered %s: %s", c.socket, resp.Status, strings.TrimSpace(string(msg)))
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("daemon at %s: %w", c.socket, err)
	}
	return nil
}
