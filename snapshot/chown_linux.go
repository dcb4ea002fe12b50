package snapshot

import (
	"fmt"
	"os"
	"syscall"
)

// chownLike gives path the owner of the file described by st.
func chownLike(path string, st os.FileInfo) error {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("stat of %s: no ownership information", st.Name())
	}
	if err := os.Lchown(path, int(sys.Uid), int(sys.Gid)); err != nil {
		return fmt.Errorf("chown %s: %w", path, err)
	}
	return nil
}
