package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazylayer/lazylayer/fs/layer"
)

// status asks a running lazylayer-snapshotter for its layers.
func (c *cli) status(ctx context.Context, args []string) error {
	fl := c.flagSet("status", "[--address SOCKET] [--json] [--accessed]",
		"Lists every layer the daemon holds: its digest, its state (lazy, populating\n"+
			"or local), bytes fetched of its compressed size, population's rate, and\n"+
			"for a FUSE mount still alive, its mountpoint and how many overlays use it.\n")
	address := fl.String("address", "/run/lazylayer/lazylayer.sock", "the daemon's snapshot API socket (status.sock sits next to it)")
	asJSON := fl.Bool("json", false, "print JSON for scripts")
	accessed := fl.Bool("accessed", false, "print the files containers opened while layers were lazy, one per line, first\nopened first: a list for lazylayer convert --prioritize")
	if err := parse(fl, args); err != nil {
		return err
	}
	if fl.NArg() != 0 {
		fmt.Fprintln(c.stderr, "lazylayer status: takes no arguments")
		fl.Usage()
		return errUsage
	}
	layers, err := fetchStatus(ctx, layer.StatusAddress(*address), *accessed)
	if err != nil {
		return err
	}
	if *accessed && !*asJSON {
		seen := map[string]bool{}
		for _, l := range layers {
			for _, p := range l.Accessed {
				if !seen[p] {
					seen[p] = true
					fmt.Fprintln(c.stdout, p)
				}
			}
		}
		return nil
	}
	if *asJSON {
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{"layers": layers})
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIGEST\tSTATE\tFETCHED\tRATE\tUSERS\tMOUNTPOINT")
	for _, l := range layers {
		fetched, rate := "complete", "-"
		if l.Size > 0 {
			fetched = fmt.Sprintf("%s / %s (%d%%)", humanSize(l.Held), humanSize(l.Size), 100*l.Held/l.Size)
		}
		if l.State == "populating" && l.Rate > 0 {
			rate = humanSize(int64(l.Rate)) + "/s"
		}
		users, mp := "-", "-"
		if l.Mountpoint != "" {
			users, mp = fmt.Sprint(l.Users), l.Mountpoint
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", shortDigest(digest.Digest(l.Digest)), l.State, fetched, rate, users, mp)
	}
	return tw.Flush()
}

// fetchStatus reads the layers from the daemon's status socket.
func fetchStatus(ctx context.Context, socket string, accessed bool) ([]layer.Status, error) {
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}
	url := "http://lazylayer/layers"
	if accessed {
		url += "?accessed=1"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ask the daemon at %s (is lazylayer-snapshotter running?): %w", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("daemon at %s answered %s", socket, resp.Status)
	}
	var out struct {
		Layers []layer.Status `json:"layers"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("daemon at %s: %w", socket, err)
	}
	return out.Layers, nil
}
