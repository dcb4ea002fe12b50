package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/fusefd"
	"github.com/lazylayer/lazylayer/fs/lazy"
)

// holderCommand is the hidden subcommand that runs the FUSE descriptor
// holder: `lazylayer-snapshotter fuse-holder <socket>`.
const holderCommand = "fuse-holder"

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

// runHolder runs the holder in this process.
func runHolder(socket string) error {
	if err := fusefd.WritePid(socket); err != nil {
		return err
	}
	defer os.Remove(fusefd.PidFile(socket))
	return fusefd.RunHolder(socket)
}

// holderSocket is where the holder of the daemon with root listens.
func holderSocket(root string) string { return filepath.Join(root, "fuse-holder.sock") }

// startHolder connects to the FUSE descriptor holder of root, starting it
// (this binary, in its own session, so that it outlives the daemon) if
// none runs.
func startHolder(root string) (*fusefd.Client, error) {
	sock := holderSocket(root)
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return fusefd.StartHolder(sock, exec.Command(exe, holderCommand, sock))
}

// handover keeps the FUSE connections of lazy mounts across restarts and
// crashes: a *fusefd.Client (the holder process) or a *fusefd.Store
// (systemd's file descriptor store).
type handover interface {
	lazy.Handover
	Unclaimed() []string
	Close() error
}

// openHandover returns where the daemon with root keeps its FUSE
// connections, with those an earlier daemon left: systemd's file
// descriptor store if useStore says so, else the holder, started if
// start is set (lazy serving is on) and none runs. It returns nil, nil
// if there is nothing to keep or take back.
func openHandover(ctx context.Context, root, mode string, start bool) (handover, error) {
	fds, err := fusefd.ListenFds()
	if err != nil {
		log.G(ctx).WithError(err).Warn("cannot read the descriptors systemd passed")
	}
	notify := os.Getenv("NOTIFY_SOCKET")
	if useStore(mode, notify, os.Getenv("FDSTORE"), fds) {
		closeForeign(ctx, fds)
		s, err := fusefd.OpenStore(notify, filepath.Join(root, "fdstore"), fds)
		if err != nil {
			return nil, err
		}
		if c, err := fusefd.Connect(holderSocket(root)); err == nil {
			if err := s.Adopt(c); err != nil {
				log.G(ctx).WithError(err).Warn("cannot move the FUSE connections the holder keeps into systemd's store")
			}
			c.Close()
		}
		log.G(ctx).WithField("taken back", len(s.Unclaimed())).Info("FUSE connections are kept in systemd's file descriptor store")
		return s, nil
	}
	for _, f := range fds {
		unix.Close(f.Fd)
	}
	if !start {
		if c, err := fusefd.Connect(holderSocket(root)); err == nil {
			return c, nil
		}
		return nil, nil
	}
	return startHolder(root)
}

// useStore decides where FUSE connections are kept (lazy.fd_store):
// systemd's store needs NOTIFY_SOCKET, and "auto" uses it when systemd
// says the store is enabled (FDSTORE, systemd 254 and later) or passed
// back connections an earlier daemon stored, which only it can serve.
func useStore(mode, notify, fdstore string, fds []fusefd.NamedFd) bool {
	if notify == "" {
		return false
	}
	ours := false
	for _, f := range fds {
		ours = ours || strings.HasPrefix(f.Name, fusefd.StoreNamePrefix)
	}
	switch mode {
	case "systemd":
		return true
	case "holder":
		return ours
	}
	max, _ := strconv.Atoi(fdstore)
	return max > 0 || ours
}

// closeForeign closes the descriptors systemd passed that the Store did
// not name (the daemon uses no socket activation).
func closeForeign(ctx context.Context, fds []fusefd.NamedFd) {
	for _, f := range fds {
		if !strings.HasPrefix(f.Name, fusefd.StoreNamePrefix) {
			log.G(ctx).WithField("name", f.Name).Warn("closing a descriptor systemd passed that lazylayer did not store")
			unix.Close(f.Fd)
		}
	}
}

// dropUnclaimed detaches the mounts whose kept FUSE connection no layer
// served again (a layer that turned local, or was removed, while its mount
// waited to retire) and lets their connections end: overlays still using
// them get ENOTCONN, as after a crash without a holder.
func dropUnclaimed(ctx context.Context, c handover) {
	for _, mp := range c.Unclaimed() {
		held, ok := c.Take(mp)
		if !ok {
			continue
		}
		unix.Unmount(mp, unix.MNT_DETACH)
		if err := c.Drop(mp); err != nil {
			log.G(ctx).WithError(err).Warn("cannot drop a kept FUSE connection")
		}
		held.Conn.Close()
		log.G(ctx).WithField("mountpoint", mp).Warn("no layer serves the FUSE connection the last daemon left; its mount is detached")
	}
}
