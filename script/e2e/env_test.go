package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// paths of the binaries under test and of the tools setup.sh installs.
var (
	snapshotterBin string // built by TestMain
	lazylayerBin   string // built by TestMain
	toolsBin       string // containerd, ctr, containerd-shim-runc-v2
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if os.Getuid() != 0 {
		fmt.Println("e2e tests need root (containerd, overlay, FUSE); skipping")
		return 0
	}
	top, err := filepath.Abs("../..")
	if err != nil {
		panic(err)
	}
	toolsBin = filepath.Join(top, ".tools", "bin")
	if v := os.Getenv("TOOLS"); v != "" {
		toolsBin = filepath.Join(v, "bin")
	}
	if _, err := os.Stat(filepath.Join(toolsBin, "containerd")); err != nil {
		fmt.Fprintf(os.Stderr, "containerd is not in %s: run script/setup.sh (make test does)\n", toolsBin)
		return 1
	}
	bin, err := os.MkdirTemp("", "lazylayer-e2e-bin-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(bin)
	snapshotterBin = filepath.Join(bin, "lazylayer-snapshotter")
	lazylayerBin = filepath.Join(bin, "lazylayer")
	build := exec.Command("go", "build", "-o", bin+"/", "./cmd/lazylayer-snapshotter", "./cmd/lazylayer")
	build.Dir = top
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build lazylayer: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// proc is a process a test started; stop is registered with t.Cleanup.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // exit status, once done is closed
}

func startProc(t *testing.T, logPath string, name string, args ...string) *proc {
	t.Helper()
	return startProcWith(t, logPath, nil, name, args...)
}

// startProcWith is startProc with the command adjusted by setup, if not
// nil, before it starts (descriptors to pass, variables to add).
func startProcWith(t *testing.T, logPath string, setup func(*exec.Cmd), name string, args ...string) *proc {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "PATH="+toolsBin+":"+os.Getenv("PATH"))
	if setup != nil {
		setup(cmd)
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	t.Cleanup(func() { p.stop(t, syscall.SIGTERM) })
	return p
}

// stop signals the process by its PID and waits; SIGKILL after 15 s.
func (p *proc) stop(t *testing.T, sig syscall.Signal) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Logf("pid %d did not stop after %v; killing", p.cmd.Process.Pid, sig)
		p.cmd.Process.Kill()
		<-p.done
	}
}

// env is one registry, one lazylayer-snapshotter and one containerd, with
// their state in a test's temporary directory.
type env struct {
	t        *testing.T
	dir      string
	regAddr  string // what image references name
	lazyRoot string
	lazySock string
	lazyLog  string
	lazy     *proc
	lazyArgs []string
	ctrSock  string
	ctrUp    bool   // containerd was started
	ctrHosts string // hosts.toml directory ctr uses: the registry itself
	// ctrConfig, if set, rewrites containerd's configuration before it
	// starts (the CRI test turns the CRI plugin on).
	ctrConfig func(string) string
}

// newEnv starts containerd and lazylayer for a registry at regAddr. The
// hosts.toml lazylayer reads sends regAddr's requests to lazyUpstream
// (regAddr itself, or a proxy in front of it). extraConfig is appended to
// lazylayer's configuration file.
func newEnv(t *testing.T, regAddr, lazyUpstream string, extraConfig ...string) *env {
	t.Helper()
	return newEnvWith(t, regAddr, lazyUpstream, nil, extraConfig...)
}

// newEnvWith is newEnv with containerd's configuration rewritten by
// ctrConfig, if not nil.
func newEnvWith(t *testing.T, regAddr, lazyUpstream string, ctrConfig func(string) string, extraConfig ...string) *env {
	t.Helper()
	dir, err := os.MkdirTemp("/var/tmp", "lazylayer-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{
		t:         t,
		dir:       dir,
		regAddr:   regAddr,
		lazyRoot:  filepath.Join(dir, "lazylayer"),
		lazySock:  filepath.Join(dir, "lazylayer.sock"),
		lazyLog:   filepath.Join(dir, "lazylayer.log"),
		ctrSock:   filepath.Join(dir, "containerd.sock"),
		ctrHosts:  filepath.Join(dir, "ctr-hosts"),
		ctrConfig: ctrConfig,
	}
	t.Cleanup(func() {
		e.unmountAll()
		if t.Failed() {
			e.dumpLogs()
		}
		// LAZYLAYER_E2E_LOGS keeps each test's daemon logs there.
		if keep := os.Getenv("LAZYLAYER_E2E_LOGS"); keep != "" {
			for _, name := range []string{"lazylayer.log", "containerd.log"} {
				if b, err := os.ReadFile(filepath.Join(dir, name)); err == nil {
					os.MkdirAll(keep, 0o755)
					os.WriteFile(filepath.Join(keep, strings.ReplaceAll(t.Name(), "/", "_")+"."+name), b, 0o644)
				}
			}
		}
		os.RemoveAll(dir)
	})
	writeHosts(t, e.ctrHosts, regAddr, regAddr)
	lazyHosts := filepath.Join(dir, "lazylayer-hosts")
	writeHosts(t, lazyHosts, regAddr, lazyUpstream)
	e.lazyArgs = []string{"--root", e.lazyRoot, "--address", e.lazySock, "--hosts-dir", lazyHosts,
		"--config", filepath.Join(dir, "lazylayer.toml"), "--log-level", "debug"}
	writeFile(t, filepath.Join(dir, "lazylayer.toml"), "[fetch]\n  range_size = \"1MiB\"\n  retries = 3\n  timeout = \"5s\"\n"+
		strings.Join(extraConfig, "\n"))
	e.startLazylayer()
	e.startContainerd()
	return e
}

func (e *env) startLazylayer() {
	e.t.Helper()
	e.startLazylayerBin(snapshotterBin)
}

// startLazylayerBin starts the daemon from binary bin.
func (e *env) startLazylayerBin(bin string) {
	e.t.Helper()
	e.lazy = startProc(e.t, e.lazyLog, bin, e.lazyArgs...)
	e.waitServing()
}

// waitServing waits until the daemon just started serves its socket and,
// once containerd runs, until containerd reaches it: containerd's
// connection to the last daemon may be in its reconnect backoff, failing
// calls at once, as a user's first call after a restart may fail.
func (e *env) waitServing() {
	e.t.Helper()
	waitFor(e.t, "lazylayer socket", func() bool {
		_, err := os.Stat(e.lazySock)
		return err == nil
	})
	if !e.ctrUp {
		return
	}
	waitFor(e.t, "containerd to reach lazylayer", func() bool {
		_, err := e.ctrErr("snapshots", "--snapshotter", "lazylayer", "ls")
		return err == nil
	})
}

// restartLazylayer stops the daemon with sig and starts it again.
func (e *env) restartLazylayer(sig syscall.Signal) {
	e.t.Helper()
	e.lazy.stop(e.t, sig)
	if sig == syscall.SIGKILL {
		os.Remove(e.lazySock)
	}
	e.startLazylayer()
}

func (e *env) startContainerd() {
	e.t.Helper()
	cfg := filepath.Join(e.dir, "containerd.toml")
	tmpl, err := os.ReadFile("../containerd.toml")
	if err != nil {
		e.t.Fatal(err)
	}
	config := strings.NewReplacer("@ROOT@", e.dir+"/containerd-root", "@STATE@", e.dir+"/containerd-state",
		"@ADDRESS@", e.ctrSock, "@LAZYLAYER@", e.lazySock).Replace(string(tmpl))
	if e.ctrConfig != nil {
		config = e.ctrConfig(config)
	}
	writeFile(e.t, cfg, config)
	p := startProc(e.t, filepath.Join(e.dir, "containerd.log"), filepath.Join(toolsBin, "containerd"), "--config", cfg)
	waitFor(e.t, "containerd", func() bool {
		_, err := e.ctrErr("version")
		return err == nil
	})
	e.ctrUp = true
	// Shims outlive containerd: stop this test's containers and their
	// shims before containerd itself goes (cleanups run last first).
	e.t.Cleanup(func() {
		for _, id := range strings.Fields(e.ctrOut("task", "ls", "-q")) {
			e.ctrErr("task", "kill", "-s", "KILL", id)
		}
		waitFor(e.t, "tasks to stop", func() bool {
			for _, id := range strings.Fields(e.ctrOut("task", "ls", "-q")) {
				e.ctrErr("task", "rm", "-f", id)
			}
			return strings.TrimSpace(e.ctrOut("task", "ls", "-q")) == ""
		})
		for _, id := range strings.Fields(e.ctrOut("container", "ls", "-q")) {
			e.ctrErr("container", "rm", id)
		}
		p.stop(e.t, syscall.SIGTERM)
	})
}

// ctr runs ctr against this env's containerd and fails the test on error.
func (e *env) ctr(args ...string) string {
	e.t.Helper()
	out, err := e.ctrErr(args...)
	if err != nil {
		e.t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// ctrOut runs ctr and returns its output, whatever the outcome.
func (e *env) ctrOut(args ...string) string {
	out, _ := e.ctrErr(args...)
	return out
}

func (e *env) ctrErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(toolsBin, "ctr"), append([]string{"--address", e.ctrSock}, args...)...)
	cmd.Env = append(os.Environ(), "PATH="+toolsBin+":"+os.Getenv("PATH"))
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return out.String() + stderr.String(), err
	}
	return out.String(), nil
}

// pull pulls ref with snapshotter sn through containerd's transfer service.
func (e *env) pull(sn, ref string) (string, error) {
	return e.ctrErr("image", "pull", "--snapshotter", sn, "--hosts-dir", e.ctrHosts, ref)
}

// lazyLogText returns what the daemon logged so far.
func (e *env) lazyLogText() string {
	b, _ := os.ReadFile(e.lazyLog)
	return string(b)
}

// snapshotDirs lists the snapshot directories under lazylayer's root.
func (e *env) snapshotDirs() map[string]bool {
	dirs, _ := os.ReadDir(filepath.Join(e.lazyRoot, "snapshots"))
	set := map[string]bool{}
	for _, d := range dirs {
		set[d.Name()] = true
	}
	return set
}

// leftovers lists what lazylayer's root holds that was not there before
// (snapshot directories not in before) plus any staging tree. containerd
// removes snapshots of deleted containers lazily, so only new directories
// count.
func (e *env) leftovers(before map[string]bool) []string {
	var left []string
	staging, _ := os.ReadDir(filepath.Join(e.lazyRoot, "staging"))
	for _, s := range staging {
		left = append(left, "staging/"+s.Name())
	}
	for d := range e.snapshotDirs() {
		if !before[d] {
			left = append(left, "snapshots/"+d)
		}
	}
	return left
}

// unmountAll unmounts every mount under the env's directory, deepest first.
func (e *env) unmountAll() {
	for _, mp := range mountsUnder(e.dir) {
		if err := unix.Unmount(mp, 0); err != nil {
			unix.Unmount(mp, unix.MNT_DETACH)
		}
	}
	if left := mountsUnder(e.dir); len(left) > 0 {
		e.t.Errorf("mounts left under %s: %v", e.dir, left)
	}
}

// mountsUnder lists the mount points below dir, deepest first.
func mountsUnder(dir string) []string {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return nil
	}
	mps := make([]string, 0, len(mounts))
	for _, m := range mounts {
		mps = append(mps, m.Mountpoint)
	}
	sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
	return mps
}

func (e *env) dumpLogs() {
	for _, name := range []string{"lazylayer.log", "containerd.log"} {
		b, _ := os.ReadFile(filepath.Join(e.dir, name))
		if len(b) > 20000 {
			b = b[len(b)-20000:]
		}
		e.t.Logf("---- %s (tail) ----\n%s", name, b)
	}
}

// writeHosts makes upstream the only place requests for host go: with a
// server of its own, containerd's hosts.toml would fall back to host itself.
func writeHosts(t *testing.T, dir, host, upstream string) {
	t.Helper()
	writeFile(t, filepath.Join(dir, host, "hosts.toml"), fmt.Sprintf(
		"server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n", upstream, upstream))
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	waitForWithin(t, what, 30*time.Second, ok)
}

// waitForWithin waits until ok, for at most d.
func waitForWithin(t *testing.T, what string, d time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
