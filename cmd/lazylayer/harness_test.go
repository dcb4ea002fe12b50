package main

// Test harness. script/internal/{registry,testimage,treecmp} are what these
// tests want, but Go's internal rule keeps them from packages outside
// script/. So the tests start docker-registry themselves, push the sample
// images with script/mkimage (go run), and compare trees with a small
// snapshot of their own.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/remote"
)

// registryBinary is Debian's docker-registry (distribution 2.8).
const registryBinary = "/usr/bin/docker-registry"

// startRegistry runs docker-registry on 127.0.0.1 until the test ends and
// returns its host:port.
func startRegistry(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(registryBinary); err != nil {
		t.Skipf("docker-registry not installed (script/setup.sh): %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %q\nhttp:\n  addr: %q\n  secret: lazylayer-test\n",
		filepath.Join(dir, "storage"), addr)
	if err := os.WriteFile(filepath.Join(dir, "config.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	cmd := exec.Command(registryBinary, "serve", filepath.Join(dir, "config.yml"))
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("registry log:\n%s", log.String())
		}
	})
	for deadline := time.Now().Add(30 * time.Second); ; {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return addr
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("registry on %s did not answer: %v", addr, err)
		}
		select {
		case <-exited:
			t.Fatalf("registry exited:\n%s", log.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// pushSample pushes the sample image kind ("busybox", "tricky") of package
// testimage to addr as repoTag, with script/mkimage.
func pushSample(t *testing.T, addr, repoTag, kind string) {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("go command not found, needed to run script/mkimage: %v", err)
	}
	cmd := exec.CommandContext(t.Context(), goBin, "run", "github.com/lazylayer/lazylayer/script/mkimage",
		"-registry", addr, "-image", repoTag, "-kind", kind, "-tmpdir", t.TempDir())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mkimage %s: %v\n%s", kind, err, out)
	}
}

// applyLayer decompresses the layer blob and applies it on dir with
// containerd's applier, converting whiteouts for overlay, as for a layer of
// its own. With dir "" it only reads the tar. It returns the digest and size
// of the tar.
func applyLayer(ctx context.Context, t *testing.T, blob io.Reader, dir string) (digest.Digest, int64) {
	t.Helper()
	d, err := compression.DecompressStream(blob)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	dg := digest.Canonical.Digester()
	c := &countingWriter{w: dg.Hash()}
	tar := io.TeeReader(d, c)
	if dir != "" {
		if _, err := archive.Apply(ctx, dir, tar, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)); err != nil {
			t.Fatalf("apply: %v", err)
		}
	}
	// Apply stops at the tar's end marker; the digest covers the padding too.
	if _, err := io.Copy(io.Discard, tar); err != nil {
		t.Fatalf("read tar: %v", err)
	}
	return dg.Digest(), c.n
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// fileInfo is what snapshot records of one path.
type fileInfo struct {
	Mode     uint32
	UID, GID uint32
	Size     int64  // regular files
	SHA256   string // regular files
	Target   string // symlinks
	Rdev     uint64
	Mtime    int64 // ns; not recorded for the root and whiteouts
	Xattrs   string
	Links    string // the other paths of a hardlink group
}

// snapshot records every path under root, skipping the names in skip at the
// root.
func snapshot(t *testing.T, root string, skip []string) map[string]fileInfo {
	t.Helper()
	out := make(map[string]fileInfo)
	inodes := make(map[uint64][]string)
	err := filepath.WalkDir(root, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, root), "/")
		if filepath.Dir(rel) == "/" && slices.Contains(skip, filepath.Base(rel)) {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		fi := fileInfo{Mode: st.Mode, UID: st.Uid, GID: st.Gid, Rdev: st.Rdev, Mtime: st.Mtim.Nano()}
		if rel == "/" || (st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0) {
			// The root directory and overlay whiteouts are the applier's,
			// and get the time they were made.
			fi.Mtime = 0
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			fi.Size = st.Size
			fi.SHA256 = fileSum(t, p)
			if st.Nlink > 1 {
				inodes[st.Ino] = append(inodes[st.Ino], rel)
			}
		case unix.S_IFLNK:
			fi.Target, err = os.Readlink(p)
			if err != nil {
				return err
			}
		}
		fi.Xattrs = xattrs(t, p)
		out[rel] = fi
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, group := range inodes {
		for _, p := range group {
			fi := out[p]
			fi.Links = strings.Join(group, " ")
			out[p] = fi
		}
	}
	return out
}

func fileSum(t *testing.T, p string) string {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// xattrs returns p's extended attributes as "name=value;..." in name order.
func xattrs(t *testing.T, p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("list xattrs of %s: %v", p, err)
	}
	var names []string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name != "" {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	var b strings.Builder
	for _, name := range names {
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("xattr %s of %s: %v", name, p, err)
		}
		fmt.Fprintf(&b, "%s=%q;", name, v[:m])
	}
	return b.String()
}

// diffTrees returns the differences between two snapshots, at most max.
func diffTrees(a, b map[string]fileInfo, max int) []string {
	var diffs []string
	for p, ai := range a {
		bi, ok := b[p]
		switch {
		case !ok:
			diffs = append(diffs, fmt.Sprintf("%q only in the original", p))
		case ai != bi:
			diffs = append(diffs, fmt.Sprintf("%q: original %+v, converted %+v", p, ai, bi))
		}
	}
	for p := range b {
		if _, ok := a[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%q only in the converted", p))
		}
	}
	slices.Sort(diffs)
	if len(diffs) > max {
		diffs = append(diffs[:max], fmt.Sprintf("… and %d more", len(diffs)-max))
	}
	return diffs
}

// readBlob reads the blob desc of ref and checks its digest and size.
func readBlob(ctx context.Context, t *testing.T, r *remote.Resolver, ref string, desc ocispec.Descriptor) []byte {
	t.Helper()
	b, err := r.Blob(ctx, ref, desc)
	if err != nil {
		t.Fatal(err)
	}
	s := b.Stream(ctx)
	defer s.Close()
	data, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("read %s: %v", desc.Digest, err)
	}
	if got := digest.FromBytes(data); got != desc.Digest || int64(len(data)) != desc.Size {
		t.Fatalf("blob %s: got %d bytes with digest %s, want %d", desc.Digest, len(data), got, desc.Size)
	}
	return data
}
