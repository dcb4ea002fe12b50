package meta

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain puts every test's directories under one base directory and
// fails the run if a mount under it outlives the tests.
func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	base, err := os.MkdirTemp("", "meta-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(base)
	os.Setenv("TMPDIR", base)
	code := m.Run()
	leaked, err := mountsUnder(base)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if len(leaked) > 0 {
		fmt.Fprintf(os.Stderr, "mounts left behind: %q\n", leaked)
		return 1
	}
	return code
}

// mountsUnder lists the mount points under dir in /proc/self/mountinfo.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			out = append(out, fields[4])
		}
	}
	return out, s.Err()
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts overlayfs and sets trusted xattrs")
	}
}

// stack is a test's set of layers: metadata trees built with Build and two
// data-only layers, local (LOCALDATA) and remote (a plain directory standing
// in for FUSEDATA).
type stack struct {
	t             testing.TB
	dir           string
	local, remote string
	n             int
	mounted       map[string]bool // mount points not yet unmounted
}

func newStack(t testing.TB) *stack {
	t.Helper()
	requireRoot(t)
	dir := t.TempDir()
	s := &stack{t: t, dir: dir, local: filepath.Join(dir, "local"), remote: filepath.Join(dir, "remote"), mounted: map[string]bool{}}
	for _, d := range []string{s.local, s.remote} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// meta builds a metadata tree and returns its path.
func (s *stack) meta(entries []Entry) string {
	s.t.Helper()
	s.n++
	dir := filepath.Join(s.dir, fmt.Sprintf("meta%d", s.n))
	if err := Build(s.t.Context(), dir, entries); err != nil {
		s.t.Fatal(err)
	}
	return dir
}

// put places content at redirect in data layer dir, by rename as
// population does.
func (s *stack) put(dir, redirect string, content string) {
	s.t.Helper()
	dst := filepath.Join(dir, redirect)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		s.t.Fatal(err)
	}
	tmp := filepath.Join(dir, fmt.Sprintf(".staging-%d", time.Now().UnixNano()))
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		s.t.Fatal(err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		s.t.Fatal(err)
	}
}

// mount mounts an overlay of lower over both data layers and returns the
// mount point; with upper it is writable and upper is its upperdir.
func (s *stack) mount(lower []string, upper string, opts ...string) string {
	s.t.Helper()
	s.n++
	mnt := filepath.Join(s.dir, fmt.Sprintf("mnt%d", s.n))
	if err := os.Mkdir(mnt, 0o755); err != nil {
		s.t.Fatal(err)
	}
	ld, err := LowerDir(lower, []string{s.local, s.remote})
	if err != nil {
		s.t.Fatal(err)
	}
	all := append([]string{"lowerdir=" + ld}, opts...)
	flags := uintptr(unix.MS_RDONLY)
	if upper != "" {
		work := upper + ".work"
		for _, d := range []string{upper, work} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				s.t.Fatal(err)
			}
		}
		all = append(all, "upperdir="+upper, "workdir="+work)
		flags = 0
	}
	if err := mountOverlay(mnt, flags, strings.Join(all, ",")); err != nil {
		s.t.Fatal(err)
	}
	s.mounted[mnt] = true
	s.t.Cleanup(func() {
		if s.mounted[mnt] {
			s.unmount(mnt)
		}
	})
	return mnt
}

// unmount unmounts mnt, which mount returned.
func (s *stack) unmount(mnt string) {
	s.t.Helper()
	if err := unix.Unmount(mnt, 0); err != nil {
		s.t.Errorf("unmount %s: %v", mnt, err)
	}
	delete(s.mounted, mnt)
}

func mountOverlay(mnt string, flags uintptr, opts string) error {
	if err := unix.Mount("overlay", mnt, "overlay", flags, opts); err != nil {
		return fmt.Errorf("mount overlay -o %s: %w", opts, err)
	}
	return nil
}

func lstat(t testing.TB, p string) *unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// xattrs returns the extended attributes of p, not following a symlink.
func xattrs(t testing.TB, p string) map[string]string {
	t.Helper()
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	out := map[string]string{}
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		out[name] = string(v[:m])
	}
	return out
}

func readFile(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// hasTrusted reports whether any xattr name is in the trusted namespace.
func hasTrusted(xa map[string]string) bool {
	for k := range xa {
		if strings.HasPrefix(k, "trusted.") {
			return true
		}
	}
	return false
}

// capNetRaw is a security.capability value (VFS_CAP_REVISION_2,
// effective) granting CAP_NET_RAW.
var capNetRaw = func() []byte {
	var b bytes.Buffer
	for _, v := range []uint32{0x02000001, 1 << unix.CAP_NET_RAW, 0, 0, 0} {
		b.Write([]byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24)})
	}
	return b.Bytes()
}()

const (
	modeDir  = syscall.S_IFDIR
	modeReg  = syscall.S_IFREG
	modeLink = syscall.S_IFLNK
)
