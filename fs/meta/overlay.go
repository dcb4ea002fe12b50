package meta

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// LowerDir returns the value of overlay's lowerdir option for the lower
// layers lower, top first (metadata trees and plain local trees), followed
// by the data-only layers data in the order overlay searches them
// ("l1:l2::d1::d2"). Paths must be absolute and free of ':', ',' and '\'.
//
// A mount needs MetacopyOption when any layer of lower follows a metadata
// tree. mount(2) takes all options in one 4096-byte page; keep paths short.
func LowerDir(lower, data []string) (string, error) {
	if len(lower) == 0 {
		return "", fmt.Errorf("lowerdir: no lower layer")
	}
	var b strings.Builder
	for i, dirs := range [][]string{lower, data} {
		for j, d := range dirs {
			if !filepath.IsAbs(d) || strings.ContainsAny(d, ":,\\\x00") {
				return "", fmt.Errorf("lowerdir: layer %q: want an absolute path without ':', ',' or '\\'", d)
			}
			switch {
			case i == 1:
				b.WriteString("::")
			case j > 0:
				b.WriteString(":")
			}
			b.WriteString(d)
		}
	}
	return b.String(), nil
}

// CheckLower returns an error if dir, a plain (not metadata) lower layer,
// holds RedirectRoot at its top: in a mount where that layer sits below a
// metadata tree, overlay would serve its files as the tree's data.
func CheckLower(dir string) error {
	_, err := os.Lstat(filepath.Join(dir, RedirectRoot))
	switch {
	case err == nil:
		return fmt.Errorf("lower layer %s holds %q, the name reserved for redirects", dir, RedirectRoot)
	case errors.Is(err, fs.ErrNotExist):
		return nil
	default:
		return fmt.Errorf("lower layer %s: %w", dir, err)
	}
}

// Check reports whether the running kernel serves metadata trees the way
// this package builds them, for the daemon to call once at start. It builds
// two one-file trees and two data-only layers in a temporary directory
// under scratch (which should be on the file system the trees will live
// on), mounts them read-only as lowerdir=meta2:meta1::data1::data2 with
// MetacopyOption, reads both files back, and removes everything.
//
// An error means the kernel lacks data-only lower layers (Linux 6.5+), the
// file system lacks trusted xattrs, or the process lacks CAP_SYS_ADMIN.
func Check(ctx context.Context, scratch string) (err error) {
	if err := ctx.Err(); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(scratch, "meta-check-")
	if err != nil {
		return fmt.Errorf("check overlay data-only layers: %w", err)
	}
	defer func() {
		if rerr := os.RemoveAll(tmp); err == nil && rerr != nil {
			err = fmt.Errorf("check overlay data-only layers: %w", rerr)
		}
	}()
	if err := checkIn(ctx, tmp); err != nil {
		return fmt.Errorf("check overlay data-only layers: %w", err)
	}
	return nil
}

func checkIn(ctx context.Context, tmp string) (err error) {
	p := func(elem ...string) string { return filepath.Join(append([]string{tmp}, elem...)...) }
	files := []struct {
		meta, name, redirect string
		want                 []byte
	}{
		{"meta1", "a", "/" + RedirectRoot + "/1/1", []byte("first data layer\n")},
		{"meta2", "b", "/" + RedirectRoot + "/2/1", []byte("second data layer\n")},
	}
	data := map[string][]byte{
		p("data1", RedirectRoot, "1", "1"): files[0].want,
		p("data2", RedirectRoot, "1", "1"): []byte("not the first data layer\n"),
		p("data2", RedirectRoot, "2", "1"): files[1].want,
	}
	for name, content := range data {
		if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(name, content, 0o644); err != nil {
			return err
		}
	}
	for _, f := range files {
		entries := []Entry{{Path: f.name, Mode: syscall.S_IFREG | 0o644, Size: int64(len(f.want)), Redirect: f.redirect}}
		if err := Build(ctx, p(f.meta), entries); err != nil {
			return err
		}
	}
	lower, err := LowerDir([]string{p("meta2"), p("meta1")}, []string{p("data1"), p("data2")})
	if err != nil {
		return err
	}
	if err := os.Mkdir(p("mnt"), 0o700); err != nil {
		return err
	}
	opts := "lowerdir=" + lower + "," + MetacopyOption
	if err := unix.Mount("overlay", p("mnt"), "overlay", unix.MS_RDONLY, opts); err != nil {
		return fmt.Errorf("mount overlay -o %s: %w", opts, err)
	}
	defer func() {
		if uerr := unix.Unmount(p("mnt"), 0); uerr != nil {
			uerr = unix.Unmount(p("mnt"), unix.MNT_DETACH)
			if err == nil && uerr != nil {
				err = fmt.Errorf("unmount %s: %w", p("mnt"), uerr)
			}
		}
	}()
	for _, f := range files {
		got, err := os.ReadFile(p("mnt", f.name))
		if err != nil {
			return err
		}
		if !bytes.Equal(got, f.want) {
			return fmt.Errorf("%s read %q, want %q", f.name, got, f.want)
		}
	}
	return nil
}
