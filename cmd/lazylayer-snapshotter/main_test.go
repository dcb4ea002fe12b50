package main

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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
	if err == nil || !strings.Contains(err.Error(), "in use by another lazylayer-snapshotter (pid "+strconv.Itoa(os.Getpid())+")") {
		t.Fatalf("second daemon on a locked root: %v", err)
	}
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
		{"root = [\n", "config"},
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
