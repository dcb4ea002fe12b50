package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/fusefd"
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

// dropUnclaimed detaches the mounts whose kept FUSE connection no layer
// served again (a layer that turned local, or was removed, while its mount
// waited to retire) and lets their connections end: overlays still using
// them get ENOTCONN, as after a crash without a holder.
func dropUnclaimed(ctx context.Context, c *fusefd.Client) {
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
