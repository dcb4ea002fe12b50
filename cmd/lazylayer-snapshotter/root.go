package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// lockRoot takes an exclusive lock on root/lock, so that two daemons never
// share a root. The lock is released when the process exits.
func lockRoot(root string) (func(), error) {
	return lockFile(filepath.Join(root, "lock"), "root "+root)
}

// lockAddress takes an exclusive lock next to the socket address, so that a
// second daemon (with another root) never removes the sockets of one that
// serves there. It also refuses an address where another program answers.
func lockAddress(address string) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return nil, err
	}
	unlock, err := lockFile(address+".lock", "socket "+address)
	if err != nil {
		return nil, err
	}
	if pid, ok := socketPeer(address); ok {
		unlock()
		return nil, fmt.Errorf("socket %s is in use by %s; choose another --address", address, describePID(pid))
	}
	return unlock, nil
}

// lockFile locks path exclusively and writes our pid (and what it guards)
// into it; what names the resource in the error when another process holds
// it.
func lockFile(path, what string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if err == unix.EWOULDBLOCK {
			pid, _ := strconv.Atoi(string(bytes.TrimSpace(holder)))
			return nil, fmt.Errorf("%s is in use by another lazylayer-snapshotter (%s)", what, describePID(pid))
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}

// socketPeer reports the pid of the process answering on the unix socket
// path, if one does.
func socketPeer(path string) (int, bool) {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return 0, false
	}
	defer c.Close()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, true
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) {
		cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cred == nil {
		return 0, true
	}
	return int(cred.Pid), true
}

// describePID names process pid for an error message: "pid 123
// (lazylayer-snapsh)", with its command name where /proc tells.
func describePID(pid int) string {
	if pid <= 0 {
		return "an unknown process"
	}
	desc := fmt.Sprintf("pid %d", pid)
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil {
		desc += " (" + string(bytes.TrimSpace(comm)) + ")"
	}
	return desc
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
