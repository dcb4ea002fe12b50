package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// mountedMsg is the message lazylayer-snapshotter logs, once per layer,
// when a layer is mounted lazily (fs/layer/lazy.go), with the fields
// layer, entries and elapsed.
const mountedMsg = "layer mounted lazily"

// lazyMount is one layer's lazy mount in a run: how long the daemon says
// it took, from the layer's blob handle in hand to the mount ready (the
// TOC read ahead claimed, or read; the index built; the TOC saved; the
// layer mounted): the lazy part of the layer's Prepare.
type lazyMount struct {
	Layer   int // index in the image's manifest, bottom first; -1 if not found
	Digest  string
	Entries int
	Seconds float64
}

// lazyMounts reads the lazy mounts of img's layers from the daemon's log.
func (b *bench) lazyMounts(ctx context.Context, logPath string, img benchImage, m mode) ([]lazyMount, error) {
	layers, err := b.layerDigests(ctx, img.repo(), m.tag)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ms, err := parseMounts(f, layers)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", logPath, err)
	}
	return ms, nil
}

// layerDigests returns the layer digests of repo:tag, bottom first.
func (b *bench) layerDigests(ctx context.Context, repo, tag string) ([]string, error) {
	key := repo + ":" + tag
	if l, ok := b.layers[key]; ok {
		return l, nil
	}
	man, _, err := b.regc.manifest(ctx, repo, tag)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range man.Layers {
		out = append(out, l.Digest.String())
	}
	if b.layers == nil {
		b.layers = map[string][]string{}
	}
	b.layers[key] = out
	return out, nil
}

// parseMounts returns the mountedMsg lines of a logrus text log.
func parseMounts(r io.Reader, layers []string) ([]lazyMount, error) {
	var out []lazyMount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := logFields(sc.Text())
		if f["msg"] != mountedMsg {
			continue
		}
		d, err := time.ParseDuration(f["elapsed"])
		if err != nil {
			return nil, fmt.Errorf("elapsed of %q: %w", sc.Text(), err)
		}
		n, err := strconv.Atoi(f["entries"])
		if err != nil {
			return nil, fmt.Errorf("entries of %q: %w", sc.Text(), err)
		}
		out = append(out, lazyMount{Layer: slices.Index(layers, f["layer"]), Digest: f["layer"], Entries: n, Seconds: d.Seconds()})
	}
	return out, sc.Err()
}

// logFields splits a logrus text line (key=value, values with spaces or
// quotes in Go's quoted form) into its fields.
func logFields(line string) map[string]string {
	out := map[string]string{}
	for line != "" {
		line = strings.TrimLeft(line, " ")
		k, rest, ok := strings.Cut(line, "=")
		if !ok || strings.ContainsRune(k, ' ') {
			break
		}
		var v string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				break
			}
			v, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else {
			v, rest, _ = strings.Cut(rest, " ")
		}
		out[k] = v
		line = rest
	}
	return out
}

// localMsg is the message lazylayer-snapshotter logs when a layer turns
// local (fs/layer/populate.go), with the field layer.
const localMsg = "layer is local"

// localWatch follows a daemon's log for the layers that turned local.
type localWatch struct {
	path   string
	off    int64
	rest   string          // a line not yet complete
	layers map[string]bool // digests logged as local
}

// poll reads what the log gained since the last call and returns how many
// layers it has said turned local.
func (w *localWatch) poll() (int, error) {
	f, err := os.Open(w.path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.NewSectionReader(f, w.off, 1<<40))
	if err != nil {
		return 0, err
	}
	w.off += int64(len(b))
	lines := strings.Split(w.rest+string(b), "\n")
	w.rest = lines[len(lines)-1]
	for _, l := range lines[:len(lines)-1] {
		if !strings.Contains(l, localMsg) {
			continue
		}
		if f := logFields(l); f["msg"] == localMsg && f["layer"] != "" {
			w.layers[f["layer"]] = true
		}
	}
	return len(w.layers), nil
}
