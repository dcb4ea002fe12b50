package cache

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Chunk files are not synced one by one (see the package documentation). The
// store trusts the files it finds at Open only when either the previous Store
// was closed cleanly (Close synced the filesystem, then wrote the file
// "clean") or the machine has not restarted since the previous Open (the boot
// ID in the file "boot_id" is the current one). Otherwise a file renamed
// shortly before a crash may have come back empty or short, and would be
// served as the chunk, so Open discards every chunk.
const (
	cleanName  = "clean"
	bootIDName = "boot_id"
	bootIDPath = "/proc/sys/kernel/random/boot_id"
)

// startRun reports whether the chunk files in the store can be trusted (see
// above), and records that a Store now uses them: it removes the clean marker,
// durably, before any chunk is written, and records the current boot ID.
func (s *Store) startRun() (trusted bool, err error) {
	clean, err := exists(filepath.Join(s.dir, cleanName))
	if err != nil {
		return false, err
	}
	current, _ := os.ReadFile(bootIDPath) // without it, only a clean Close is trusted
	current = bytes.TrimSpace(current)
	previous, err := os.ReadFile(filepath.Join(s.dir, bootIDName))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	trusted = clean || (len(current) > 0 && bytes.Equal(bytes.TrimSpace(previous), current))

	if clean {
		if err := os.Remove(filepath.Join(s.dir, cleanName)); err != nil {
			return false, err
		}
	}
	if err := os.WriteFile(filepath.Join(s.dir, bootIDName), append(current, '\n'), 0o600); err != nil {
		return false, err
	}
	if err := syncDir(s.dir); err != nil {
		return false, err
	}
	return trusted, nil
}

// endRun syncs the filesystem that holds the store and marks the store as
// closed cleanly.
func (s *Store) endRun() error {
	if err := unix.Syncfs(int(s.lock.Fd())); err != nil {
		return &os.PathError{Op: "syncfs", Path: s.dir, Err: err}
	}
	// Not synced itself: if the marker is lost, the next Open only discards
	// chunks it could have kept.
	return os.WriteFile(filepath.Join(s.dir, cleanName), nil, 0o600)
}

func exists(path string) (bool, error) {
	_, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
