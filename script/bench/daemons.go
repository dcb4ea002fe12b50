package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// tools are the programs the bench runs.
type tools struct {
	bin         string // directory holding containerd, ctr and the runc shim
	containerd  string
	ctr         string
	snapshotter string // lazylayer-snapshotter
	cli         string // the lazylayer CLI; "" until it is built
	ctrConfig   string // script/containerd.toml, the template of containerd's configuration
	// peers are the other remote snapshotters' daemons by snapshotter
	// name (stargz, soci), built by script/bench.sh from this module's
	// peers/ packages beside the bench's binary; a peer's mode needs its
	// daemon.
	peers map[string]string
}

// peerNames are the peer snapshotters, each a containerd proxy plugin of
// that name served by lazylayer-bench-NAME beside the bench's binary.
var peerNames = []string{"stargz", "soci"}

// isPeer reports whether snapshotter is a peer's.
func isPeer(snapshotter string) bool { return slices.Contains(peerNames, snapshotter) }

// snapshotterDaemon names the remote snapshotter daemon of a mode's
// snapshotter in the samples' Daemons: the peer's, else lazylayer's (idle
// for overlayfs).
func snapshotterDaemon(snapshotter string) string {
	if isPeer(snapshotter) {
		return snapshotter
	}
	return "lazylayer"
}

func findTools(o options) (tools, error) {
	bin := filepath.Join(o.top, ".tools", "bin")
	if v := os.Getenv("TOOLS"); v != "" {
		bin = filepath.Join(v, "bin")
	}
	t := tools{
		bin:         bin,
		containerd:  filepath.Join(bin, "containerd"),
		ctr:         filepath.Join(bin, "ctr"),
		snapshotter: filepath.Join(o.top, "bin", "lazylayer-snapshotter"),
		ctrConfig:   filepath.Join(o.top, "script", "containerd.toml"),
	}
	for _, p := range []string{t.containerd, t.ctr, filepath.Join(bin, "containerd-shim-runc-v2")} {
		if _, err := os.Stat(p); err != nil {
			return t, fmt.Errorf("%s is missing: run script/setup.sh (make bench does): %w", p, err)
		}
	}
	if _, err := os.Stat(t.snapshotter); err != nil {
		return t, fmt.Errorf("%s is missing: run make build (make bench does): %w", t.snapshotter, err)
	}
	if _, err := exec.LookPath("runc"); err != nil {
		return t, fmt.Errorf("runc is missing: run script/setup.sh: %w", err)
	}
	if cli := filepath.Join(o.top, "bin", "lazylayer"); fileExists(cli) {
		t.cli = cli
	}
	// The peers' daemons are built beside the bench's own binary.
	self, err := os.Executable()
	if err != nil {
		return t, err
	}
	t.peers = map[string]string{}
	for _, m := range o.modes {
		sn := findMode(m).snapshotter
		if !isPeer(sn) {
			continue
		}
		p := filepath.Join(filepath.Dir(self), "lazylayer-bench-"+sn)
		if !fileExists(p) {
			return t, fmt.Errorf("%s is missing for mode %s: script/bench.sh builds it (cd script/bench && go build -o %s ./peers/%s)", p, m, p, sn)
		}
		t.peers[sn] = p
	}
	return t, nil
}

// pin copies lazylayer's binaries into dir and returns tools using the
// copies, so a `make build` elsewhere during a long run does not mix two
// versions into one set of results.
func (t tools) pin(dir string) (tools, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return t, err
	}
	for _, p := range []*string{&t.snapshotter, &t.cli} {
		if *p == "" {
			continue
		}
		dst := filepath.Join(dir, filepath.Base(*p))
		if err := copyFile(*p, dst); err != nil {
			return t, err
		}
		*p = dst
	}
	peers := map[string]string{}
	for name, p := range t.peers {
		dst := filepath.Join(dir, filepath.Base(p))
		if err := copyFile(p, dst); err != nil {
			return t, err
		}
		peers[name] = dst
	}
	t.peers = peers
	return t, nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return out.Close()
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// env returns the environment for the daemons: the tools first in PATH, so
// containerd finds the shim it was built with.
func (t tools) env() []string {
	env := []string{"PATH=" + t.bin + ":" + os.Getenv("PATH")}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	return env
}

// stack is one containerd and one lazylayer-snapshotter with fresh state
// directories: started for a measured run and stopped after it, so every
// run starts with no image, no content and no snapshots, and the daemons'
// peak RSS belongs to that run.
type stack struct {
	dir        string // state; removed by close
	ctr        ctrClient
	lazySock   string
	lazyLog    string // lazylayer-snapshotter's log
	lazylayer  *proc
	peer       *proc // a peer snapshotter's daemon, or nil
	containerd *proc
}

// startStack starts lazylayer and then containerd with state under dir
// (which must not exist) and logs named logPrefix-*.log. hostsDir is the
// hosts.toml directory both use to reach the registry; lazyConfig is
// lazylayer's configuration file (TOML), "" for the defaults. peer, if not
// "", is a peer snapshotter (stargz, soci) started too, with its defaults,
// and added to containerd's configuration as a proxy plugin of that name.
func startStack(ctx context.Context, t tools, dir, logPrefix, hostsDir, lazyConfig, peer string) (_ *stack, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	s := &stack{
		dir:      dir,
		lazySock: filepath.Join(dir, "lazylayer.sock"),
		ctr:      ctrClient{bin: t.ctr, sock: filepath.Join(dir, "containerd.sock"), hostsDir: hostsDir, env: t.env()},
	}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	lazyCfg := filepath.Join(dir, "lazylayer.toml")
	if err := os.WriteFile(lazyCfg, []byte("# defaults for everything but the paths\n"+lazyConfig), 0o644); err != nil {
		return nil, err
	}
	s.lazyLog = logPrefix + "-lazylayer.log"
	s.lazylayer, err = startProc(t.snapshotter, s.lazyLog, t.env(),
		"--root", filepath.Join(dir, "lazylayer"), "--address", s.lazySock,
		"--hosts-dir", hostsDir, "--config", lazyCfg)
	if err != nil {
		return nil, err
	}
	if err := waitUntil(ctx, "lazylayer's socket", s.lazylayer, func() bool { return fileExists(s.lazySock) }); err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, "containerd.toml")
	tmpl, err := os.ReadFile(t.ctrConfig)
	if err != nil {
		return nil, err
	}
	config := strings.NewReplacer("@ROOT@", filepath.Join(dir, "containerd-root"), "@STATE@", filepath.Join(dir, "containerd-state"),
		"@ADDRESS@", s.ctr.sock, "@LAZYLAYER@", s.lazySock).Replace(string(tmpl))
	if peer != "" {
		sock, err := s.startPeer(ctx, t, peer, logPrefix)
		if err != nil {
			return nil, err
		}
		config += peerContainerdConfig(peer, sock)
	}
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		return nil, err
	}
	s.containerd, err = startProc(t.containerd, logPrefix+"-containerd.log", t.env(), "--config", cfg)
	if err != nil {
		return nil, err
	}
	if err := waitUntil(ctx, "containerd", s.containerd, func() bool {
		_, err := s.ctr.output(ctx, "version")
		return err == nil
	}); err != nil {
		return nil, err
	}
	return s, nil
}

// peerContainerdConfig is what containerd's configuration adds for a peer:
// the proxy plugin, with the remote-snapshot labels both peers read, and
// the transfer service unpacking for it.
func peerContainerdConfig(peer, sock string) string {
	return fmt.Sprintf(`
[proxy_plugins.%[1]s]
  type = "snapshot"
  address = %[2]q
  [proxy_plugins.%[1]s.exports]
    enable_remote_snapshot_annotations = "true"

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = %[1]q
  differ = "walking"
`, peer, sock)
}

// startPeer starts the peer snapshotter's daemon with state under s.dir
// and returns its socket. Its configuration is the default but for what
// this stack's paths need: soci reads its index from containerd's content
// store (its default) and must be told where containerd listens.
func (s *stack) startPeer(ctx context.Context, t tools, peer, logPrefix string) (string, error) {
	bin, ok := t.peers[peer]
	if !ok {
		return "", fmt.Errorf("no daemon for snapshotter %s", peer)
	}
	sock := filepath.Join(s.dir, peer+".sock")
	cfg := filepath.Join(s.dir, peer+".toml")
	text := "# the defaults\n"
	if peer == "soci" {
		text += fmt.Sprintf("[content_store]\n  type = \"containerd\"\n  containerd_address = %q\n", s.ctr.sock)
	}
	if err := os.WriteFile(cfg, []byte(text), 0o644); err != nil {
		return "", err
	}
	var err error
	s.peer, err = startProc(bin, logPrefix+"-"+peer+".log", t.env(),
		"--root", filepath.Join(s.dir, peer), "--address", sock, "--config", cfg)
	if err != nil {
		return "", err
	}
	if err := waitUntil(ctx, peer+"'s socket", s.peer, func() bool { return fileExists(sock) }); err != nil {
		return "", err
	}
	return sock, nil
}

// waitUntil polls ok for up to 30 s while p runs.
func waitUntil(ctx context.Context, what string, p *proc, ok func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for !ok() {
		if !p.running() {
			return fmt.Errorf("waiting for %s: %w", what, p.exitError())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// usage returns what each daemon consumed so far, by name.
func (s *stack) usage() (map[string]usage, error) {
	out := map[string]usage{}
	for _, p := range []*proc{s.containerd, s.lazylayer, s.peer} {
		if p == nil {
			continue
		}
		u, err := procUsage(p.pid())
		if err != nil {
			return nil, err
		}
		out[daemonName(p)] = u
	}
	return out, nil
}

func daemonName(p *proc) string {
	if p.name == "lazylayer-snapshotter" {
		return "lazylayer"
	}
	return strings.TrimPrefix(p.name, "lazylayer-bench-")
}

// close stops the containers, containerd, its shims and lazylayer, by PID,
// unmounts everything below the state directory and removes it. It does
// all of that even if a step fails, and returns the errors.
func (s *stack) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	if s.containerd != nil && s.containerd.running() {
		errs = append(errs, s.ctr.removeAll(ctx))
	}
	if s.containerd != nil {
		errs = append(errs, s.containerd.stop(15*time.Second))
	}
	// Shims outlive containerd by design; none is left once its task is
	// gone, but a failed run may leave one.
	errs = append(errs, killShims(s.ctr.sock))
	if s.lazylayer != nil {
		errs = append(errs, s.lazylayer.stop(15*time.Second))
	}
	if s.peer != nil {
		errs = append(errs, s.peer.stop(15*time.Second))
	}
	errs = append(errs, unmountUnder(s.dir))
	if err := os.RemoveAll(s.dir); err != nil {
		errs = append(errs, fmt.Errorf("remove state: %w", err))
	}
	return errors.Join(errs...)
}
