package layer

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// moveTree replaces the empty directory dst with the tree src. The root of
// the tree keeps dst's mode and owner, which the snapshotter chose.
func moveTree(src, dst string) error {
	st, err := os.Stat(dst)
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("stat %s: no ownership information", dst)
	}
	if err := os.Lchown(src, int(sys.Uid), int(sys.Gid)); err != nil {
		return err
	}
	if err := os.Chmod(src, st.Mode().Perm()); err != nil {
		return err
	}
	// os.Rename refuses an existing directory as target; rename(2) replaces
	// an empty one atomically.
	if err := unix.Rename(src, dst); err != nil {
		return fmt.Errorf("move layer tree into place: %w", err)
	}
	return nil
}

// emptyDir removes everything in dir, keeping dir.
func emptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}
