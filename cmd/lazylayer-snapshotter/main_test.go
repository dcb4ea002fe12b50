package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/fusefd"
)

func runArgs(t *testing.T, root string, extra ...string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	dir := t.TempDir()
	config := filepath.Join(dir, "config.toml")
	os.WriteFile(config, nil, 0o644)
	args := append([]string{"--root", root, "--address", filepath.Join(dir, "sock"),
		"--config", config, "--hosts-dir", dir}, extra...)
	return run(ctx, args)
}

func TestRefusesLockedRoot(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	root := t.TempDir()
	unlock, err := lockRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	err = runArgs(t, root)
	if err == nil || !strings.Contains(err.Error(), "in use by another lazylayer-snapshotter (pid "+strconv.Itoa(os.Getpid())+" (") {
		t.Fatalf("second daemon on a locked root: %v", err)
	}
}

// TestRefusesBusySocket: a socket where another process answers is never
// taken over, whoever holds it; the error names that process.
func TestRefusesBusySocket(t *testing.T) {
	addr := filepath.Join(t.TempDir(), "snapshotter.sock")
	l, err := net.Listen("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	unlock, err := lockAddress(addr)
	if err == nil {
		unlock()
		t.Fatal("a daemon took a socket another process serves")
	}
	if want := fmt.Sprintf("socket %s is in use by pid %d", addr, os.Getpid()); !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
	if _, err := os.Stat(addr); err != nil {
		t.Errorf("the other process's socket: %v", err)
	}

	// A socket file nobody answers on is stale: it is taken.
	l.Close()
	stale := filepath.Join(t.TempDir(), "stale.sock")
	sl, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	sl.(*net.UnixListener).SetUnlinkOnClose(false)
	sl.Close()
	unlock, err = lockAddress(stale)
	if err != nil {
		t.Fatalf("a stale socket: %v", err)
	}
	unlock()
}

func TestRefusesOverlayRoot(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs overlay mounts")
	}
	dir := t.TempDir()
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		os.Mkdir(filepath.Join(dir, d), 0o755)
	}
	opts := "lowerdir=" + dir + "/lower,upperdir=" + dir + "/upper,workdir=" + dir + "/work"
	if err := unix.Mount("overlay", dir+"/merged", "overlay", 0, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir+"/merged", unix.MNT_DETACH) })
	err := runArgs(t, dir+"/merged/root")
	if err == nil || !strings.Contains(err.Error(), "is on a filesystem (overlay) that overlayfs cannot use as an upper directory") {
		t.Fatalf("daemon with its root on overlay: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct{ file, want string }{
		{"log_level = \"info\"\nroots = \"/x\"\n", "unknown setting roots"},
		{"[fetch]\n  range_size = \"1KiB\"\n", "fetch.range_size"},
		{"[fetch]\n  timeout = \"soon\"\n", "fetch.timeout"},
		{"[lazy]\n  populate_bandwidth = \"fast\"\n", "lazy.populate_bandwidth"},
		{"[lazy]\n  cache_size = \"-1\"\n", "lazy.cache_size"},
		{"[lazy]\n  profile_dir = \"profiles\"\n", "lazy.profile_dir"},
		{"root = [\n", "config"},
		{"[cri]\n  credential_ttl = \"forever\"\n", "cri.credential_ttl"},
		{"[cri]\n  address = \"/run/x.sock\"\n  containerd_address = \"\"\n", "cri.containerd_address"},
		{"metric_address = \"127.0.0.1:1\"\n", "unknown setting metric_address"},
		{"memory_limit = \"1MiB\"\n", "memory_limit"},
		{"memory_limit = \"lots\"\n", "memory_limit"},
	} {
		path := filepath.Join(t.TempDir(), "config.toml")
		os.WriteFile(path, []byte(tc.file), 0o644)
		cfg := defaultConfig()
		err := cfg.load(path, true)
		if err == nil {
			_, err = cfg.Fetch.parse()
		}
		if err == nil {
			_, err = cfg.Lazy.parse()
		}
		if err == nil {
			_, err = cfg.CRI.parse()
		}
		if err == nil {
			_, err = parseMemoryLimit(cfg.MemoryLimit)
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: error %v, want one mentioning %q", tc.file, err, tc.want)
		}
	}
	cfg := defaultConfig()
	if err := cfg.load(filepath.Join(t.TempDir(), "absent.toml"), false); err != nil {
		t.Errorf("a missing default config file: %v", err)
	}
	if err := cfg.load(filepath.Join(t.TempDir(), "absent.toml"), true); err == nil {
		t.Error("a missing config file the user named was accepted")
	}
}

// TestMemoryLimit: the memory limit sets what it bounds; the default keeps
// the daemon within 64 MiB with its code (docs/operations.md).
func TestMemoryLimit(t *testing.T) {
	for _, tc := range []struct {
		in            string
		limit, chunks int64
	}{
		{defaultConfig().MemoryLimit, 48 << 20, 12 << 20},
		{"256MiB", 256 << 20, 64 << 20},
		{"0", 0, 64 << 20},
	} {
		got, err := parseMemoryLimit(tc.in)
		if err != nil {
			t.Fatalf("memory_limit %q: %v", tc.in, err)
		}
		if got.limit != tc.limit || got.chunks != tc.chunks {
			t.Errorf("memory_limit %q: limit %d, chunks in memory %d; want %d, %d", tc.in, got.limit, got.chunks, tc.limit, tc.chunks)
		}
	}
}

// TestShippedConfig: the node configuration shipped in script/deploy (and
// copied into the DaemonSet's ConfigMap) is one this daemon accepts.
func TestShippedConfig(t *testing.T) {
	cfg := defaultConfig()
	if err := cfg.load("../../script/deploy/config.toml", true); err != nil {
		t.Fatal(err)
	}
	if _, err := cfg.Fetch.parse(); err != nil {
		t.Error(err)
	}
	if _, err := cfg.Lazy.parse(); err != nil {
		t.Error(err)
	}
	if _, err := cfg.CRI.parse(); err != nil {
		t.Error(err)
	}
	if cfg.MetricsAddress == "" || cfg.CRI.Address == "" {
		t.Errorf("the shipped configuration turns off the metrics endpoint (%q) or the CRI proxy (%q)", cfg.MetricsAddress, cfg.CRI.Address)
	}
}

// TestUseStore: systemd's file descriptor store is used only under
// systemd, when it is on or holds connections only it can give back.
func TestUseStore(t *testing.T) {
	ours := []fusefd.NamedFd{{Fd: 3, Name: fusefd.StoreName("/mp")}}
	other := []fusefd.NamedFd{{Fd: 3, Name: "socket"}}
	for _, c := range []struct {
		mode, notify, fdstore string
		fds                   []fusefd.NamedFd
		want                  bool
	}{
		{"auto", "", "4096", ours, false}, // not run by systemd
		{"auto", "/run/systemd/notify", "", nil, false},
		{"auto", "/run/systemd/notify", "0", other, false},
		{"auto", "/run/systemd/notify", "4096", nil, true},
		{"auto", "/run/systemd/notify", "", ours, true},
		{"systemd", "/run/systemd/notify", "", nil, true},
		{"systemd", "", "", nil, false},
		{"holder", "/run/systemd/notify", "4096", nil, false},
		{"holder", "/run/systemd/notify", "4096", ours, true},
	} {
		if got := useStore(c.mode, c.notify, c.fdstore, c.fds); got != c.want {
			t.Errorf("useStore(%q, %q, FDSTORE=%q, %v) = %v, want %v", c.mode, c.notify, c.fdstore, c.fds, got, c.want)
		}
	}
}
