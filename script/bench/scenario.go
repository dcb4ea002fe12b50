package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/script/internal/registry"
)

// profile is a network between the clients and the registry.
type profile struct {
	name     string
	about    string
	rateMbit int           // 0: unshaped
	rtt      time.Duration // added by the link proxy
}

// headlineProfile is the profile of the headline figures.
const headlineProfile = "100mbit-20ms"

func profiles() []profile {
	return []profile{
		{name: "unshaped", about: "loopback, no shaping, no added latency"},
		{name: headlineProfile, about: "100 Mbit/s (tc htb) and 20 ms round trip (link proxy)", rateMbit: 100, rtt: 20 * time.Millisecond},
	}
}

func profileNames() []string {
	var out []string
	for _, p := range profiles() {
		out = append(out, p.name)
	}
	return out
}

func findProfile(name string) profile {
	for _, p := range profiles() {
		if p.name == name {
			return p
		}
	}
	panic("unknown profile " + name)
}

// mode is a way to pull and run an image.
type mode struct {
	name        string
	snapshotter string
	tag         string
	about       string
	// held runs lazylayer with population held (lazy.populate =
	// "manual"): the container started lazily is measured while every
	// layer is lazy, then population is released.
	held bool
	// profiled runs lazylayer with the access profiles a first run of
	// the workload recorded (lazy.profile_dir; see ensureProfiles).
	profiled bool
}

// heldConfig is lazylayer's configuration in a held mode.
const heldConfig = "[lazy]\n  populate = \"manual\"\n"

func allModes() []mode {
	return []mode{
		{name: "overlayfs", snapshotter: "overlayfs", tag: tagGzip,
			about: "containerd's overlayfs snapshotter pulls and unpacks the gzip image itself (the baseline)"},
		{name: "lazylayer", snapshotter: "lazylayer", tag: tagGzip,
			about: "lazylayer, gzip image: each layer fetched with parallel ranged GETs and unpacked by lazylayer"},
		{name: "lazylayer-estargz", snapshotter: "lazylayer", tag: tagConverted,
			about: "lazylayer, the image converted by `lazylayer convert` (eStargz): layers mounted lazily"},
		{name: "lazylayer-prioritized", snapshotter: "lazylayer", tag: tagPrioritized,
			about: "lazylayer, converted again with `--prioritize` the files a first run opened (`lazylayer status --accessed`): they arrive right after the mount"},
		{name: "lazylayer-profiled", snapshotter: "lazylayer", tag: tagConverted, profiled: true,
			about: "lazylayer, the same eStargz image as lazylayer-estargz, with the access profiles (`lazylayer profile save`) of a first run on another daemon in `lazy.profile_dir`: the files it opened are fetched right after the mount"},
		{name: "stargz", snapshotter: "stargz", tag: tagConverted,
			about: "stargz-snapshotter " + stargzVersion + " (its daemon wired from its library, default configuration), the same eStargz image as lazylayer-estargz: layers mounted lazily"},
		{name: "soci", snapshotter: "soci", tag: tagSOCI,
			about: "soci-snapshotter " + sociVersion + " (its daemon wired from its library, default configuration), the gzip image with a SOCI index (manifest v2) built by its library: layers mounted lazily"},
		{name: "lazylayer-held", snapshotter: "lazylayer", tag: tagConverted, held: true,
			about: "lazylayer, the converted image with population held (`lazy.populate = \"manual\"`): the container started lazily is measured while every layer is lazy, " +
				"then population is released as `lazylayer populate --all --wait` does and it is measured again once every layer is local; " +
				"only under the unshaped profile (or the first one selected): beyond the cold start, what it measures does not depend on the network"},
	}
}

// heldProfile is the one profile a held mode runs under: "unshaped" if
// selected, else the first selected. What it measures beyond the cold
// start does not depend on the network, and releasing population at
// 100 Mbit/s would add minutes per run (3 for the synthetic image).
func heldProfile(o options) string {
	if slices.Contains(o.profiles, "unshaped") {
		return "unshaped"
	}
	return o.profiles[0]
}

// profileModes are the modes of modes that run under profile.
func profileModes(o options, modes []string, profile string) []string {
	var out []string
	for _, m := range modes {
		if !findMode(m).held || profile == heldProfile(o) {
			out = append(out, m)
		}
	}
	return out
}

func modeNames() []string {
	var out []string
	for _, m := range allModes() {
		out = append(out, m.name)
	}
	return out
}

func findMode(name string) mode {
	for _, m := range allModes() {
		if m.name == name {
			return m
		}
	}
	panic("unknown mode " + name)
}

// Bounds on the steps of a run.
const (
	pullTimeout  = 30 * time.Minute
	startTimeout = 10 * time.Minute
	stepTimeout  = 10 * time.Minute
)

// bench measures runs against one registry behind one link.
type bench struct {
	o        options
	tools    tools
	hosts    string // hosts.toml directory sending the link address to the link
	stateDir string // each run's daemons' state, removed after it
	ref      string // host:port image references name: the link
	link     *link
	counter  *registry.Proxy // between the link and the registry: counts requests
	status   statusProbe
	regc     registryClient // the registry, directly
	images   map[string]pushedImage
	seq      int // runs so far, for log and state names
	execs    int // ctr task execs so far, for their IDs
	// layers caches the layer digests of each image reference's
	// manifest, by repository:tag, bottom first.
	layers map[string][]string
}

// measure runs img with mode under the current profile once, cold.
func (b *bench) measure(ctx context.Context, img benchImage, prof profile, m mode, run int) (s sample, err error) {
	s = sample{Image: img.name, Profile: prof.name, Mode: m.name, Run: run, Daemons: map[string]daemonUsage{}}
	if s.Busy, err = waitQuiet(ctx, b.o.quiet); err != nil {
		return s, err
	}
	b.seq++
	name := fmt.Sprintf("%03d-%s-%s-%s-%d", b.seq, img.name, prof.name, m.name, run)
	logPrefix := filepath.Join(b.o.work, "logs", name)
	lazyCfg := ""
	if m.held {
		lazyCfg = heldConfig
	}
	if m.profiled {
		lazyCfg = profiledConfig(b.o, img)
	}
	if b.o.lazyTOML != "" {
		lazyCfg = b.o.lazyTOML + "\n" + lazyCfg
	}
	peer := ""
	if isPeer(m.snapshotter) {
		peer = m.snapshotter
	}
	st, err := startStack(ctx, b.tools, b.stateDir, logPrefix, b.hosts, lazyCfg, peer)
	if err != nil {
		return s, err
	}
	defer func() {
		if cerr := st.close(); cerr != nil && err == nil {
			err = fmt.Errorf("clean up after the run: %w", cerr)
		}
	}()
	if err := dropCaches(); err != nil {
		return s, err
	}
	ref := b.ref + "/" + img.repo() + ":" + m.tag
	id := "llbench-" + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(b.seq)

	use0, err := st.usage()
	if err != nil {
		return s, err
	}
	cold, err := b.coldStart(ctx, st, img, m, ref, id, &s)
	if cold != nil {
		defer st.ctr.kill(cold)
	}
	if err != nil {
		return s, err
	}
	if m.snapshotter == "lazylayer" {
		if s.Mounts, err = b.lazyMounts(ctx, logPrefix+"-lazylayer.log", img, m); err != nil {
			return s, err
		}
	}
	useLocal, err := st.usage()
	if err != nil {
		return s, err
	}
	if b.o.steady {
		if err := b.steady(ctx, st, m, img, ref, id, cold.id, &s); err != nil {
			return s, err
		}
	}
	useEnd, err := st.usage()
	if err != nil {
		return s, err
	}
	for name, u := range useEnd {
		s.Daemons[name] = daemonUsage{
			PeakRSS:  u.PeakRSS,
			CPULocal: (useLocal[name].CPU - use0[name].CPU).Seconds(),
			CPU:      (u.CPU - use0[name].CPU).Seconds(),
		}
	}
	return s, nil
}

// coldStart pulls ref and runs the workload, recording in s the times
// until the pull ended, the first output line and the image was local,
// and what the registry side served until the last two. It returns the
// container, still running, for the caller to kill.
func (b *bench) coldStart(ctx context.Context, st *stack, img benchImage, m mode, ref, id string, s *sample) (*container, error) {
	link0, req0 := b.link.counters(), len(b.counter.Requests())
	served := func() (int64, int64) {
		return b.link.counters().sub(link0).Down, int64(len(b.counter.Requests()) - req0)
	}
	t0 := time.Now()
	since := func(t time.Time) float64 { return t.Sub(t0).Seconds() }
	pctx, cancel := context.WithTimeout(ctx, pullTimeout)
	err := st.ctr.pull(pctx, m.snapshotter, ref)
	cancel()
	if err != nil {
		return nil, err
	}
	tPull := time.Now()
	s.Pull = since(tPull)
	// A layer lazylayer fetched in full is local before its Prepare
	// returns: asked right away (one request on the status socket, well
	// under a millisecond), the daemon tells whether the image is local at
	// the pull's end, as overlayfs' is. Otherwise waitLocal asks again
	// after the container's first output.
	var localAtPull time.Time
	if m.snapshotter == "lazylayer" && !m.held {
		if r, err := statusReport(ctx, st); err == nil && allLocal(r, b.images[img.name].Layers) {
			localAtPull = time.Now()
		}
	}

	cold, err := st.ctr.run(ctx, m.snapshotter, ref, id+"-cold", "set -e\n"+img.coldCmd+"\nexec sleep 1000000")
	if err != nil {
		return nil, err
	}
	first, err := cold.next(ctx, startTimeout)
	if err != nil {
		return cold, fmt.Errorf("cold start: %w", err)
	}
	s.ColdStart = since(first.at)
	s.FirstBytes, s.FirstRequests = served()
	s.FirstConns = b.link.counters().sub(link0).Conns
	if first.text != "hi" {
		return cold, fmt.Errorf("cold start: first output line %q, want %q", first.text, "hi")
	}

	if m.held {
		if err := b.measureHeld(ctx, st, m, cold.id, s); err != nil {
			return cold, err
		}
		if err := release(ctx, st); err != nil {
			return cold, err
		}
	}
	tLocal, from := localAtPull, "status at pull"
	if tLocal.IsZero() {
		if tLocal, from, err = b.waitLocal(ctx, st, m, img, tPull, served); err != nil {
			return cold, err
		}
	}
	s.Local, s.LocalFrom = since(tLocal), from
	s.LocalBytes, s.LocalRequests = served()
	return cold, nil
}

// waitLocal returns when the image became fully local and how that was
// known: for lazylayer from `lazylayer status` when the CLI has it, for a
// peer when the registry side had sent (served) as many bytes as the
// image's layers and the peer's artifacts hold, else (and for overlayfs)
// when the pull ended.
func (b *bench) waitLocal(ctx context.Context, st *stack, m mode, img benchImage, pulled time.Time, served func() (int64, int64)) (time.Time, string, error) {
	if isPeer(m.snapshotter) {
		return b.waitPeerLocal(ctx, m, img, served)
	}
	if m.snapshotter != "lazylayer" || !b.status.available() {
		return pulled, "pull", nil
	}
	ctx, cancel := context.WithTimeout(ctx, pullTimeout)
	defer cancel()
	layers := b.images[img.name].Layers
	// `lazylayer status` is asked only once the daemon's log says every
	// layer turned local: run every 100 ms, the CLI took a tenth of a
	// core from population on these two-core machines.
	watch := localWatch{path: st.lazyLog, layers: map[string]bool{}}
	for {
		local := false
		n, err := watch.poll()
		if err != nil || n >= layers { // without its log, ask each time
			local, err = b.status.allLocal(ctx, st.lazySock, layers)
		}
		if err != nil {
			return time.Time{}, "", err
		}
		if local && m.held {
			return time.Now(), "released", nil
		}
		if local {
			return time.Now(), "status", nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, "", fmt.Errorf("waiting for the image to be local: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// peerIdle is how long a peer may send nothing before the bench stops
// waiting for its image to turn local: soci's background fetch starts after
// 30 s of silence (background_fetch.silence_period_msec, its default).
const peerIdle = 60 * time.Second

// waitPeerLocal waits until the registry side has sent at least the bytes
// of the image's layers (plus, for soci, its SOCI index and zTOCs) since
// the pull began: the peers report no per-layer state, and each fetches
// every layer in the background by default. A byte fetched twice counts
// twice, so this can be early by what was fetched twice, never late. If
// nothing more arrives for peerIdle, the peer never turns the image local
// by itself; the result says so ("never").
func (b *bench) waitPeerLocal(ctx context.Context, m mode, img benchImage, served func() (int64, int64)) (time.Time, string, error) {
	rec := b.images[img.name]
	want := rec.ConvertedSize
	if m.tag == tagSOCI {
		want = rec.Size + rec.SOCIArtifacts
	}
	ctx, cancel := context.WithTimeout(ctx, pullTimeout)
	defer cancel()
	last, lastAt := int64(-1), time.Now()
	for {
		got, _ := served()
		if got >= want {
			return time.Now(), "bytes", nil
		}
		if got != last {
			last, lastAt = got, time.Now()
		} else if time.Since(lastAt) > peerIdle {
			return lastAt, "never", nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, "", fmt.Errorf("waiting for %s to fetch the image (%d of %d bytes): %w", m.name, got, want, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// steady measures reads in the container started lazily (lazyID) and in
// one started now that the image is local, each with cold and warm
// caches, into s.
func (b *bench) steady(ctx context.Context, st *stack, m mode, img benchImage, ref, id, lazyID string, s *sample) error {
	local, err := st.ctr.run(ctx, m.snapshotter, ref, id+"-local", "echo ready; exec sleep 1000000")
	if err != nil {
		return err
	}
	defer st.ctr.kill(local)
	if l, err := local.next(ctx, startTimeout); err != nil || l.text != "ready" {
		return fmt.Errorf("start a container on the local image: %q, %w", l.text, err)
	}
	big := b.images[img.name].BigFile
	// A warm read of a small file takes about as long as the timing's
	// noise: repeat it, and report the time per read.
	repeat := max(1, int((256<<20)/max(b.images[img.name].BigSize, 1)))
	dd := "dd if=" + big + " of=/dev/null bs=1M 2>/dev/null"
	scripts := map[string]string{
		"file/cold": dd,
		"file/warm": fmt.Sprintf("i=0; while [ $i -lt %d ]; do %s; i=$((i+1)); done", repeat, dd),
		// GNU tar skips reading file data when writing to /dev/null.
		"tree/cold": "tar cf - " + img.tree + " 2>/dev/null | wc -c",
		"tree/warm": "tar cf - " + img.tree + " 2>/dev/null | wc -c",
		"find/cold": findScript,
		"find/warm": findScript,
	}
	perRun := map[string]int{"file/warm": repeat}
	if m.snapshotter == "lazylayer" {
		// The files the container opened while its layers were lazy.
		if s.FUSEBound, err = fuseBound(ctx, st); err != nil {
			return err
		}
	}
	for _, container := range []string{"lazy", "local"} {
		cid := lazyID
		if container == "local" {
			cid = local.id
		}
		for _, what := range steadyWhats() {
			for _, cache := range []string{"cold", "warm"} {
				if err := b.timed(ctx, st, m, cid, steadyKey(container, what, cache), scripts[what+"/"+cache], perRun[what+"/"+cache], s); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// findScript lists the container's root file system: every lookup,
// getattr and readdir, no file data.
const findScript = "find / -xdev 2>/dev/null | wc -l"

// steadyWhats are the steady-state commands: the largest file, a tar of
// the image's tree, and a find over the root file system.
func steadyWhats() []string { return []string{"file", "tree", "find"} }

// timed runs script in container cid, dropping the caches first for a
// cold key, and records in s the seconds it took (per run of repeat), the
// number a tree command printed, and for lazylayer the FUSE requests the
// daemon answered meanwhile.
func (b *bench) timed(ctx context.Context, st *stack, m mode, cid, key, script string, repeat int, s *sample) error {
	if strings.HasSuffix(key, "/cold") {
		if err := dropCaches(); err != nil {
			return err
		}
	}
	var fuse0 fuseCount
	if m.snapshotter == "lazylayer" {
		var err error
		if fuse0, err = fuseRequests(ctx, st); err != nil {
			return err
		}
	}
	b.execs++
	ectx, cancel := context.WithTimeout(ctx, stepTimeout)
	d, lines, err := st.ctr.exec(ectx, cid, "steady"+strconv.Itoa(b.execs), script)
	cancel()
	if err != nil {
		return err
	}
	if m.snapshotter == "lazylayer" {
		fuse1, err := fuseRequests(ctx, st)
		if err != nil {
			return err
		}
		if fuse1.counted {
			if s.FUSE == nil {
				s.FUSE = map[string]int64{}
			}
			s.FUSE[key] = fuse1.since(fuse0)
		}
	}
	if s.Steady == nil {
		s.Steady = map[string]float64{}
	}
	s.Steady[key] = d.Seconds() / float64(max(1, repeat))
	if strings.Contains(key, "/tree/") || strings.Contains(key, "/find/") {
		n, err := printedCount(lines)
		if err != nil || n == 0 {
			return fmt.Errorf("%s in %s printed %q, want a count: %v", script, cid, lines, err)
		}
		if s.Out == nil {
			s.Out = map[string]int64{}
		}
		s.Out[key] = n
	}
	return nil
}

// printedCount parses the one number wc printed.
func printedCount(lines []string) (int64, error) {
	if len(lines) != 1 {
		return 0, fmt.Errorf("%d lines", len(lines))
	}
	return strconv.ParseInt(strings.TrimSpace(lines[0]), 10, 64)
}

// dropCaches writes back dirty pages and drops the page, dentry and inode
// caches, so the next reads come from disk or the network.
func dropCaches() error {
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		return fmt.Errorf("drop caches: %w", err)
	}
	return nil
}
