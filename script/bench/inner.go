package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/lazylayer/lazylayer/script/internal/registry"
)

// linkAddr is where the link proxy listens inside the namespace; the image
// references name it.
const linkAddr = "127.0.0.1:5000"

// maxFailures is how many runs in a row may fail before the bench stops.
const maxFailures = 3

// runInner runs inside the namespace: registry, images, link, and the
// measured runs; then the report.
func runInner(ctx context.Context, o options, ns string) error {
	start := time.Now()
	t, err := findTools(o)
	if err != nil {
		return err
	}
	// Read before measuring: a missing file should not cost a run.
	before, err := o.loadBefore()
	if err != nil {
		return err
	}
	if err := bringUpLoopback(ctx); err != nil {
		return err
	}
	if err := removeTree(o.work); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(o.work, "logs"), 0o755); err != nil {
		return err
	}
	if t, err = t.pin(filepath.Join(o.work, "bin")); err != nil {
		return err
	}
	regDir := filepath.Join(o.cache, "registry")
	if err := os.MkdirAll(regDir, 0o755); err != nil {
		return err
	}
	os.Truncate(filepath.Join(regDir, "registry.log"), 0)
	reg, err := registry.Start(ctx, regDir)
	if err != nil {
		return fmt.Errorf("start the registry: %w", err)
	}
	defer reg.Stop()
	direct, hosts := filepath.Join(o.work, "hosts-direct"), filepath.Join(o.work, "hosts")
	if err := writeHosts(direct, reg.Addr()); err != nil {
		return err
	}
	if err := writeHosts(hosts, linkAddr); err != nil {
		return err
	}

	conv := converter{hostsDir: direct}
	if !o.copyConv {
		conv.cli = t.cli
	}
	regc := registryClient{addr: reg.Addr()}
	pushed := map[string]pushedImage{}
	for _, name := range o.images {
		rec, err := ensureImage(ctx, o.cache, regc, conv, catalogue(name))
		if err != nil {
			return err
		}
		if slices.Contains(catalogue(name).modes(o), "lazylayer-prioritized") {
			if err := ensurePrioritized(ctx, o, t, regc, direct, catalogue(name), &rec); err != nil {
				return err
			}
			if err := writeJSON(filepath.Join(o.cache, "images", name+".json"), rec); err != nil {
				return err
			}
		}
		if slices.Contains(catalogue(name).modes(o), "lazylayer-profiled") {
			if err := ensureProfiles(ctx, o, t, regc, direct, catalogue(name), rec); err != nil {
				return err
			}
		}
		if slices.Contains(catalogue(name).modes(o), "soci") {
			if err := ensureSOCI(ctx, o, regc, catalogue(name), &rec); err != nil {
				return err
			}
			if err := writeJSON(filepath.Join(o.cache, "images", name+".json"), rec); err != nil {
				return err
			}
		}
		pushed[name] = rec
	}
	if o.prepare {
		logf("images ready in the registry at %s (storage %s)", reg.Addr(), reg.StorageDir())
		return nil
	}

	stateDir := filepath.Join(o.work, "state")
	about := "the work directory's file system (-state-disk=false)"
	if o.disk {
		d, err := mountStateDisk(ctx, o.work)
		if err != nil {
			return err
		}
		defer func() {
			if err := d.unmount(); err != nil {
				logf("%v", err)
			}
		}()
		stateDir, about = filepath.Join(d.dir, "state"), d.about()
	}

	counter, err := registry.NewProxy(reg.Addr())
	if err != nil {
		return err
	}
	defer counter.Close()
	lk, err := newLink(linkAddr, counter.Addr())
	if err != nil {
		return err
	}
	defer lk.close()
	sh := shaper{port: lk.port()}
	defer sh.clear(context.WithoutCancel(ctx))

	b := &bench{o: o, tools: t, hosts: hosts, stateDir: stateDir, ref: linkAddr, link: lk, counter: counter, regc: regc,
		status: newStatusProbe(ctx, t.cli), images: pushed}
	res := newResults(ctx, o, t, b, conv)
	res.Meta.Disk = about
	resPath := filepath.Join(o.work, "results.json")
	err = b.loop(ctx, res, sh, regc, resPath)
	res.Meta.Duration = time.Since(start).Round(time.Second)
	res.Meta.LoadEnd = loadAvg()
	if werr := writeJSON(resPath, res); werr != nil && err == nil {
		err = werr
	}
	if err != nil {
		return fmt.Errorf("%w (results so far: %s)", err, resPath)
	}
	keep := filepath.Join(o.cache, "results", res.Meta.Date.Format("20060102-150405")+".json")
	if err := writeJSON(keep, res); err != nil {
		return err
	}
	logf("results: %s (copy in %s)", resPath, keep)
	printSummary(os.Stdout, res)
	if o.docs == "-" {
		return nil
	}
	return writeDocs(o.docs, filepath.Join(o.top, "docs", "benchmarks.md"), res, before)
}

// loop measures every profile, image, run and mode, saving the results
// after each run. The modes' order rotates from run to run, so none is
// always first after the caches were dropped.
func (b *bench) loop(ctx context.Context, res *results, sh shaper, regc registryClient, resPath string) error {
	failed := 0
	total := 0
	for _, name := range b.o.images {
		img := catalogue(name)
		for _, pn := range b.o.profiles {
			total += img.runs(b.o) * len(profileModes(b.o, img.modes(b.o), pn))
		}
	}
	for _, pn := range b.o.profiles {
		prof := findProfile(pn)
		if err := sh.apply(ctx, prof.rateMbit); err != nil {
			return err
		}
		b.link.setRTT(prof.rtt)
		info := profileInfo{Name: prof.name, About: prof.about, RateMbit: prof.rateMbit, RTT: prof.rtt}
		var err error
		if info.MeasuredMbit, info.MeasuredRTT, err = b.probe(ctx, regc); err != nil {
			return fmt.Errorf("probe profile %s: %w", prof.name, err)
		}
		logf("profile %s: link measured %.0f Mbit/s, %.1f ms round trip", prof.name, info.MeasuredMbit, float64(info.MeasuredRTT)/1e6)
		res.Profiles = append(res.Profiles, info)
		for _, name := range b.o.images {
			img := catalogue(name)
			for run := 1; run <= img.runs(b.o); run++ {
				modes := profileModes(b.o, img.modes(b.o), prof.name)
				if len(modes) == 0 {
					break
				}
				k := (run - 1) % len(modes)
				modes = append(modes[k:], modes[:k]...)
				for _, mn := range modes {
					logf("[%d/%d] %s, %s, %s, run %d", len(res.Samples)+1, total, img.name, prof.name, mn, run)
					s, err := b.measure(ctx, img, prof, findMode(mn), run)
					if ctx.Err() != nil {
						return ctx.Err()
					}
					if err != nil {
						s.Error = err.Error()
						logf("run failed: %v", err)
						if failed++; failed >= maxFailures {
							res.Samples = append(res.Samples, s)
							return fmt.Errorf("%d runs in a row failed; the last: %w", failed, err)
						}
					} else {
						failed = 0
						logf("    %s", s.line())
					}
					res.Samples = append(res.Samples, s)
					if err := writeJSON(resPath, res); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

// line is a one-line summary of a sample for the log.
func (s sample) line() string {
	l := fmt.Sprintf("pull %.2fs, first output %.2fs, local %.2fs; %.1f MB in %d requests (%d connections) before the output; others busy %.0f%%",
		s.Pull, s.ColdStart, s.Local, mb(s.FirstBytes), s.FirstRequests, s.FirstConns, s.Busy*100)
	for _, d := range append([]string{"containerd", "lazylayer"}, peerNames...) {
		u, ok := s.Daemons[d]
		if !ok {
			continue
		}
		l += fmt.Sprintf("; %s %.0f MB peak, %.2f CPU s", d, mb(u.PeakRSS), u.CPULocal)
	}
	return l
}

// probe measures the link as clients see it: the round trip of a small
// request on an open connection, and the rate of a 16 MiB ranged GET of a
// layer blob.
func (b *bench) probe(ctx context.Context, regc registryClient) (mbit float64, rtt time.Duration, err error) {
	client := &http.Client{Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()
	get := func(path string, rng string) (int64, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+linkAddr+path, nil)
		if err != nil {
			return 0, err
		}
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		if err == nil && resp.StatusCode/100 != 2 {
			err = fmt.Errorf("GET %s: %s", path, resp.Status)
		}
		return n, err
	}
	if _, err := get("/v2/", ""); err != nil { // opens the connection
		return 0, 0, err
	}
	for range 5 {
		t := time.Now()
		if _, err := get("/v2/", ""); err != nil {
			return 0, 0, err
		}
		if d := time.Since(t); rtt == 0 || d < rtt {
			rtt = d
		}
	}
	repo := catalogue(b.o.images[0]).repo()
	m, _, err := regc.manifest(ctx, repo, tagGzip)
	if err != nil {
		return 0, 0, err
	}
	if len(m.Layers) == 0 {
		return 0, 0, errors.New("image without layers")
	}
	blob := m.Layers[0]
	for _, l := range m.Layers {
		if l.Size > blob.Size {
			blob = l
		}
	}
	want := min(blob.Size, 16<<20)
	t := time.Now()
	n, err := get("/v2/"+repo+"/blobs/"+blob.Digest.String(), fmt.Sprintf("bytes=0-%d", want-1))
	if err != nil {
		return 0, 0, err
	}
	d := max(time.Since(t)-rtt, time.Microsecond)
	return float64(n*8) / d.Seconds() / 1e6, rtt, nil
}

// writeHosts writes a hosts.toml directory that sends requests for host
// to host itself over plain HTTP.
func writeHosts(dir, host string) error {
	p := filepath.Join(dir, host, "hosts.toml")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return os.WriteFile(p, []byte(fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n", host, host)), 0o644)
}

// loadAvg returns the first three fields of /proc/loadavg.
func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// logf prints a progress line on stderr.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[bench %s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
