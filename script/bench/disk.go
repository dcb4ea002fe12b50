package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// The daemons' state (containerd's content store and snapshots, the
// snapshotters' caches, lazylayer's metadata trees and local layers) goes
// on an ext4 file system with a journal, made afresh in a sparse file for
// each invocation and mounted through a loop device, as a node's disk
// would be. The root file system of the machines the published figures
// come from is ext4 without a journal: there ext4's inode allocator skips
// every inode freed in the last one to five minutes (recently_deleted in
// fs/ext4/ialloc.c, only without a journal), and each run removes the
// last one's tens of thousands of files, so creating a file got slower
// the more runs went before (8,000 files: 1.2 s there, 0.12 s on a fresh
// ext4 with a journal; fs/meta BenchmarkBuild). That penalised the modes
// that create files while a container starts (overlayfs' unpack,
// lazylayer's metadata tree) and not the pure FUSE peers. -state-disk=false
// keeps the state on the work directory's file system.

// stateDiskSize is the sparse file's size: the largest image's state with
// room to spare. Discard returns freed blocks to the host file system.
const stateDiskSize = 64 << 30

// stateDisk is the mounted file system the runs' state goes on.
type stateDisk struct {
	img, dir string
}

// mountStateDisk makes a fresh ext4 file system in a sparse file under
// work and mounts it at work/disk.
func mountStateDisk(ctx context.Context, work string) (*stateDisk, error) {
	d := &stateDisk{img: filepath.Join(work, "state-disk.img"), dir: filepath.Join(work, "disk")}
	os.Remove(d.img)
	f, err := os.Create(d.img)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(stateDiskSize)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.MkdirAll(d.dir, 0o755)
	}
	if err != nil {
		os.Remove(d.img)
		return nil, fmt.Errorf("state disk: %w", err)
	}
	for _, args := range [][]string{
		{"mkfs.ext4", "-q", "-F", "-L", "llbench", d.img},
		{"mount", "-o", "loop,discard", d.img, d.dir},
	} {
		if out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput(); err != nil {
			os.Remove(d.img)
			return nil, fmt.Errorf("state disk: %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return d, nil
}

// unmount unmounts the disk (its loop device goes with it) and removes
// its file.
func (d *stateDisk) unmount() error {
	if err := unix.Unmount(d.dir, 0); err != nil {
		if err := unix.Unmount(d.dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount the state disk %s: %w", d.dir, err)
		}
	}
	return os.Remove(d.img)
}

// about describes the disk for the report.
func (d *stateDisk) about() string {
	return fmt.Sprintf("ext4 with a journal (mkfs.ext4 defaults), %d GiB sparse file on a loop device, made afresh for this invocation", stateDiskSize>>30)
}
