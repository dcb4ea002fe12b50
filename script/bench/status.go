package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// statusProbe asks `lazylayer status --json` whether every layer is local.
// Until the CLI has that command, the bench takes the end of the pull as
// the moment lazylayer's image is local, which is exact for the full-fetch
// path (every layer is local before Prepare returns).
type statusProbe struct {
	cli string // "" when the CLI or its status command is missing
}

// newStatusProbe checks that cli answers `status --help`.
func newStatusProbe(ctx context.Context, cli string) statusProbe {
	if cli == "" {
		return statusProbe{}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := exec.CommandContext(ctx, cli, "status", "--help").Run(); err != nil {
		return statusProbe{}
	}
	return statusProbe{cli: cli}
}

func (p statusProbe) available() bool { return p.cli != "" }

// describe says how "fully local" is determined, for the report.
func (p statusProbe) describe() string {
	if p.available() {
		return "lazylayer: every layer `local` in `lazylayer status --json`; overlayfs: the pull's end"
	}
	return "the pull's end for both (lazylayer's full-fetch path makes every layer local before Prepare returns; `lazylayer status` does not exist yet)"
}

// layerStatus is one layer in `lazylayer status --json`.
type layerStatus struct {
	Digest     string `json:"digest"`
	State      string `json:"state"` // lazy, populating or local
	Fetched    int64  `json:"fetched"`
	Size       int64  `json:"size"`
	Mountpoint string `json:"mountpoint"`
	Users      int    `json:"users"`
}

// allLocal reports whether the daemon at socket holds at least layers
// layers and all of them are local.
func (p statusProbe) allLocal(ctx context.Context, socket string, layers int) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.cli, "status", "--json", "--address", socket)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return false, fmt.Errorf("lazylayer status: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	var st struct {
		Layers []layerStatus `json:"layers"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return false, fmt.Errorf("decode lazylayer status: %w", err)
	}
	if len(st.Layers) < layers {
		return false, nil
	}
	for _, l := range st.Layers {
		if l.State != "local" {
			return false, nil
		}
	}
	return true, nil
}
