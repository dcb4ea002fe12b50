package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Binary is where Debian's docker-registry package installs the registry.
const Binary = "/usr/bin/docker-registry"

// startTimeout bounds how long Start waits for the registry to answer.
const startTimeout = 30 * time.Second

// Registry is a docker-registry child process serving plain HTTP on
// 127.0.0.1. Stop it with Stop.
type Registry struct {
	dir     string
	addr    string
	cmd     *exec.Cmd
	exited  chan struct{} // closed once cmd.Wait returned
	waitErr error         // cmd.Wait's result; read only after exited is closed

	stopOnce sync.Once
	stopErr  error // set by the first Stop
}

// StartT starts a registry in a fresh t.TempDir(), fails the test if that
// does not work, and stops it when the test ends. If the test failed, the
// end of the registry's log is logged.
func StartT(t testing.TB) *Registry {
	t.Helper()
	r, err := Start(t.Context(), t.TempDir())
	if err != nil {
		t.Fatalf("start registry: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Stop(); err != nil {
			t.Errorf("stop registry: %v", err)
		}
		if t.Failed() {
			if b, err := os.ReadFile(r.LogPath()); err == nil {
				t.Logf("registry log (end):\n%s", tail(b, 4<<10))
			}
		}
	})
	return r
}

// Start runs Binary with a config written into dir (which must exist) and
// returns once GET /v2/ answers. dir receives config.yml, the storage
// directory and registry.log, which collects the registry's stdout and
// stderr (its application log and access log).
//
// ctx bounds the start only; the process runs until Stop, which the caller
// must call (in tests: t.Cleanup(func() { r.Stop() })).
func Start(ctx context.Context, dir string) (*Registry, error) {
	if _, err := os.Stat(Binary); err != nil {
		return nil, fmt.Errorf("docker-registry not installed (run script/setup.sh): %w", err)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("registry dir: %w", err)
	}
	// The free port is found by listening and closing; if someone takes it
	// in between, the registry exits and we try another.
	for attempt := 0; ; attempt++ {
		r, err := start(ctx, dir)
		if err == nil || attempt == 4 || !errors.Is(err, errAddrInUse) {
			return r, err
		}
	}
}

var errAddrInUse = errors.New("address in use")

func start(ctx context.Context, dir string) (*Registry, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	r := &Registry{dir: dir, addr: addr, exited: make(chan struct{})}
	if err := os.MkdirAll(r.StorageDir(), 0o755); err != nil {
		return nil, fmt.Errorf("create storage dir: %w", err)
	}
	cfg := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfg, []byte(config(r.StorageDir(), addr)), 0o644); err != nil {
		return nil, fmt.Errorf("write registry config: %w", err)
	}
	logFile, err := os.OpenFile(r.LogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open registry log: %w", err)
	}
	logStart, _ := logFile.Seek(0, io.SeekEnd)

	r.cmd = exec.Command(Binary, "serve", cfg)
	r.cmd.Dir = dir
	r.cmd.Stdout, r.cmd.Stderr = logFile, logFile
	// Own process group, so a terminal's ^C goes to the test only, and die
	// with the parent if it dies without calling Stop.
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = r.cmd.Start()
	logFile.Close() // the child has its own descriptor
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", Binary, err)
	}
	go func() {
		r.waitErr = r.cmd.Wait()
		close(r.exited)
	}()

	if err := r.waitReady(ctx); err != nil {
		r.Stop()
		b, _ := os.ReadFile(r.LogPath())
		if int64(len(b)) >= logStart {
			b = b[logStart:]
		}
		if bytes.Contains(b, []byte("address already in use")) {
			err = fmt.Errorf("%w: %w", errAddrInUse, err)
		}
		return nil, fmt.Errorf("registry on %s: %w; log:\n%s", addr, err, tail(b, 2<<10))
	}
	return r, nil
}

func config(storage, addr string) string {
	return fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: false
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: %q
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %q
  secret: lazylayer-test-registry
`, storage, addr)
}

// freeAddr returns a 127.0.0.1 address with a port that was free a moment
// ago.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	return addr, nil
}

// waitReady polls GET /v2/ until it answers 200, the process exits, ctx is
// done or startTimeout passes.
func (r *Registry) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	client := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+r.addr+"/v2/", nil)
		if err != nil {
			return fmt.Errorf("probe: %w", err)
		}
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-r.exited:
			return fmt.Errorf("registry exited before answering: %w", r.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("wait for registry to answer: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// Addr returns the host:port the registry serves plain HTTP on, e.g.
// "127.0.0.1:41234".
func (r *Registry) Addr() string { return r.addr }

// Dir returns the directory holding config.yml, the storage and the log.
func (r *Registry) Dir() string { return r.dir }

// StorageDir returns the filesystem storage driver's root directory.
func (r *Registry) StorageDir() string { return filepath.Join(r.dir, "storage") }

// LogPath returns the file receiving the registry's stdout and stderr.
func (r *Registry) LogPath() string { return filepath.Join(r.dir, "registry.log") }

// BlobPath returns the file distribution stores the blob dgst's bytes in
// (whether or not it exists yet). A test may corrupt or truncate it: the
// registry serves whatever the file holds, without checking its digest.
func (r *Registry) BlobPath(dgst digest.Digest) string {
	hex := dgst.Encoded()
	if len(hex) < 2 {
		hex = "__"
	}
	return filepath.Join(r.StorageDir(), "docker", "registry", "v2", "blobs",
		dgst.Algorithm().String(), hex[:2], hex, "data")
}

// PID returns the registry's process ID.
func (r *Registry) PID() int { return r.cmd.Process.Pid }

// Stop kills the registry process by PID and waits for it to exit. It is
// safe to call more than once; later calls return the first call's result.
func (r *Registry) Stop() error {
	r.stopOnce.Do(func() {
		select {
		case <-r.exited:
			// It died on its own: report why, unless it was killed by us.
			if r.waitErr != nil {
				r.stopErr = fmt.Errorf("registry exited early: %w", r.waitErr)
			}
			return
		default:
		}
		if err := r.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			r.stopErr = fmt.Errorf("kill registry pid %d: %w", r.cmd.Process.Pid, err)
			return
		}
		<-r.exited
	})
	return r.stopErr
}

// tail returns about the last n bytes of b, starting at a line.
func tail(b []byte, n int) []byte {
	if len(b) <= n {
		return b
	}
	b = b[len(b)-n:]
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		b = b[i+1:]
	}
	return b
}

// AccessEntry is one line of the registry's access log.
type AccessEntry struct {
	Remote    string
	Time      time.Time
	Method    string
	URI       string // path and query, as requested
	Status    int
	Size      int64 // response body bytes; 0 when the log says "-"
	Referer   string
	UserAgent string
}

// AccessLog parses the access log lines in LogPath, in order. Other lines
// (the application log) are skipped. The log has no request headers: a
// ranged GET is recognisable only by its status 206; use a Proxy to see the
// ranges themselves. A line is written after its response is sent, so a
// client can see a response before its line exists: see WaitAccessLog.
func (r *Registry) AccessLog() ([]AccessEntry, error) {
	b, err := os.ReadFile(r.LogPath())
	if err != nil {
		return nil, fmt.Errorf("read registry log: %w", err)
	}
	var out []AccessEntry
	for line := range strings.SplitSeq(string(b), "\n") {
		if e, ok := parseAccessLine(line); ok {
			out = append(out, e)
		}
	}
	return out, nil
}

// WaitAccessLog re-reads the access log every 10ms until done returns true
// for its entries, and returns them; or fails when ctx is done.
func (r *Registry) WaitAccessLog(ctx context.Context, done func([]AccessEntry) bool) ([]AccessEntry, error) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		entries, err := r.AccessLog()
		if err != nil {
			return nil, err
		}
		if done(entries) {
			return entries, nil
		}
		select {
		case <-ctx.Done():
			return entries, fmt.Errorf("wait for registry access log: %w", ctx.Err())
		case <-tick.C:
		}
	}
}
