package lazy

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// PassthroughSupport reports whether FUSE passthrough can back lazy layers'
// files with files under dir, and if not, why. Passthrough needs kernel
// 6.9 or later, CAP_SYS_ADMIN, and backing files on a filesystem that is
// not itself stacked (overlay, FUSE, ecryptfs); one failed backing file
// registration would disable passthrough for a whole mount, so lazylayer
// offers none unless all of this holds.
func PassthroughSupport(dir string) (bool, string) {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return false, fmt.Sprintf("uname: %v", err)
	}
	release := unix.ByteSliceToString(uts.Release[:])
	if !kernelAtLeast(release, 6, 9) {
		return false, "kernel " + release + " is older than 6.9"
	}
	if !hasCapSysAdmin() {
		return false, "the daemon lacks CAP_SYS_ADMIN"
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false, fmt.Sprintf("statfs %s: %v", dir, err)
	}
	switch st.Type {
	case unix.OVERLAYFS_SUPER_MAGIC, unix.FUSE_SUPER_MAGIC, unix.ECRYPTFS_SUPER_MAGIC:
		return false, fmt.Sprintf("%s is on a stacked filesystem (magic 0x%x)", dir, st.Type)
	}
	return true, ""
}

func kernelAtLeast(release string, major, minor int) bool {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return false
	}
	ma, err1 := strconv.Atoi(parts[0])
	mi, err2 := strconv.Atoi(strings.TrimFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' }))
	if err1 != nil || err2 != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

func hasCapSysAdmin() bool {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<unix.CAP_SYS_ADMIN) != 0
		}
	}
	return false
}

// openBeneath opens the file rel below root for reading, following no
// symlink and never leaving root.
func openBeneath(root, rel string) (*os.File, error) {
	dfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: root, Err: err}
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat2(dfd, rel, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: root + "/" + rel, Err: err}
	}
	return os.NewFile(uintptr(fd), root+"/"+rel), nil
}
