package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// lockRoot takes an exclusive lock on root/lock, so that two daemons never
// share a root. The lock is released when the process exits.
func lockRoot(root string) (func(), error) {
	path := filepath.Join(root, "lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if err == unix.EWOULDBLOCK {
			return nil, fmt.Errorf("root %s is in use by another lazylayer-snapshotter (pid %s)", root, bytes.TrimSpace(holder))
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}

// checkOverlayUpper mounts a small overlay with its upper directory under
// root: if the kernel refuses, containers could never write to their
// snapshots, so the daemon refuses to start.
func checkOverlayUpper(root string) error {
	td, err := os.MkdirTemp(root, "overlay-check-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(td)
	dirs := map[string]string{}
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		dirs[d] = filepath.Join(td, d)
		if err := os.Mkdir(dirs[d], 0o755); err != nil {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", dirs["lower"], dirs["upper"], dirs["work"])
	if err := unix.Mount("overlay", dirs["merged"], "overlay", 0, opts); err != nil {
		return fmt.Errorf("root %s is on a filesystem (%s) that overlayfs cannot use as an upper directory: %w; choose --root on ext4 or xfs",
			root, fsType(root), err)
	}
	if err := unix.Unmount(dirs["merged"], 0); err != nil {
		return fmt.Errorf("unmount overlay check: %w", err)
	}
	return nil
}

// fsType names the filesystem holding path, for error messages.
func fsType(path string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return "unknown"
	}
	switch st.Type {
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlay"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.FUSE_SUPER_MAGIC:
		return "fuse"
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.NFS_SUPER_MAGIC:
		return "nfs"
	}
	return fmt.Sprintf("magic 0x%x", st.Type)
}
