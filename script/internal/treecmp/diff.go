package treecmp

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Compare snapshots the trees a and b with the zero Options and returns
// their differences. See Options.Compare.
func Compare(ctx context.Context, a, b string) ([]string, error) {
	return Options{}.Compare(ctx, a, b)
}

// Compare snapshots the trees a and b and returns their differences as Diff
// describes them; nil means the trees are the same.
func (o Options) Compare(ctx context.Context, a, b string) ([]string, error) {
	sa, err := o.Snapshot(ctx, a)
	if err != nil {
		return nil, err
	}
	sb, err := o.Snapshot(ctx, b)
	if err != nil {
		return nil, err
	}
	return Diff(sa, sb), nil
}

// Diff returns one line per difference between the snapshots a and b, in
// path order, each starting with the quoted path. "a" and "b" in the lines
// mean the first and second snapshot. A path in only one tree, or of a
// different file type, gives one line; otherwise each differing attribute
// gives one: mode bits, uid, gid, size (regular files), content sha256
// (regular files of equal size), symlink target, device number, each xattr,
// and mtime. Size is not compared for directories and symlinks. Finally,
// for paths in both trees, hardlink groups (non-directories sharing an
// inode) must match: each set of groups that differs gives one line.
func Diff(a, b map[string]Info) []string {
	var out []string
	for _, p := range unionKeys(a, b) {
		ia, inA := a[p]
		ib, inB := b[p]
		switch {
		case !inB:
			out = append(out, fmt.Sprintf("%q: only in a (%s)", p, typeName(ia.Mode)))
		case !inA:
			out = append(out, fmt.Sprintf("%q: only in b (%s)", p, typeName(ib.Mode)))
		default:
			out = append(out, diffInfo(p, ia, ib)...)
		}
	}
	return append(out, diffHardlinks(a, b)...)
}

func unionKeys[V any](a, b map[string]V) []string {
	keys := slices.Collect(maps.Keys(a))
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

func diffInfo(p string, a, b Info) []string {
	if a.Type() != b.Type() {
		return []string{fmt.Sprintf("%q: type %s != %s", p, typeName(a.Mode), typeName(b.Mode))}
	}
	var out []string
	add := func(format string, args ...any) {
		out = append(out, fmt.Sprintf("%q: ", p)+fmt.Sprintf(format, args...))
	}
	if pa, pb := a.Mode&^unix.S_IFMT, b.Mode&^unix.S_IFMT; pa != pb {
		add("mode %04o != %04o", pa, pb)
	}
	if a.Uid != b.Uid {
		add("uid %d != %d", a.Uid, b.Uid)
	}
	if a.Gid != b.Gid {
		add("gid %d != %d", a.Gid, b.Gid)
	}
	switch a.Type() {
	case unix.S_IFREG:
		if a.Size != b.Size {
			add("size %d != %d", a.Size, b.Size)
		} else if a.SHA256 != b.SHA256 {
			add("content sha256 %s != %s", a.SHA256, b.SHA256)
		}
	case unix.S_IFLNK:
		if a.Target != b.Target {
			add("symlink target %q != %q", a.Target, b.Target)
		}
	case unix.S_IFCHR, unix.S_IFBLK:
		if a.Rdev != b.Rdev {
			add("device %d:%d != %d:%d", unix.Major(a.Rdev), unix.Minor(a.Rdev), unix.Major(b.Rdev), unix.Minor(b.Rdev))
		}
	}
	for _, name := range unionKeys(a.Xattrs, b.Xattrs) {
		va, inA := a.Xattrs[name]
		vb, inB := b.Xattrs[name]
		switch {
		case !inB:
			add("xattr %s only in a (%q)", name, va)
		case !inA:
			add("xattr %s only in b (%q)", name, vb)
		case va != vb:
			add("xattr %s %q != %q", name, va, vb)
		}
	}
	if !a.Mtime.Equal(b.Mtime) {
		add("mtime %s != %s", a.Mtime.Format(time.RFC3339Nano), b.Mtime.Format(time.RFC3339Nano))
	}
	return out
}

func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFCHR:
		return "char device"
	case unix.S_IFBLK:
		return "block device"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFSOCK:
		return "socket"
	}
	return fmt.Sprintf("type %#o", mode&unix.S_IFMT)
}

// diffHardlinks compares, for the non-directories present in both
// snapshots, which of them share an inode. Paths whose groups differ are
// joined into connected sets, and each set gives one line listing its
// groups in a and in b.
func diffHardlinks(a, b map[string]Info) []string {
	var common []string
	for p, ia := range a {
		if ib, ok := b[p]; ok && ia.Type() != unix.S_IFDIR && ib.Type() != unix.S_IFDIR {
			common = append(common, p)
		}
	}
	slices.Sort(common)
	ga, gb := linkGroups(a, common), linkGroups(b, common)
	var out []string
	done := make(map[string]bool)
	for _, p := range common {
		if done[p] || slices.Equal(ga[p], gb[p]) {
			continue
		}
		// Collect every path connected to p through a group in a or b.
		set := []string{p}
		done[p] = true
		for i := 0; i < len(set); i++ {
			for _, q := range append(ga[set[i]], gb[set[i]]...) {
				if !done[q] {
					done[q] = true
					set = append(set, q)
				}
			}
		}
		slices.Sort(set)
		out = append(out, fmt.Sprintf("%q: hardlinks differ: a %s, b %s", set[0], groupsOf(set, ga), groupsOf(set, gb)))
	}
	return out
}

// linkGroups maps each path in paths to the sorted paths in paths sharing
// its inode in m (itself included).
func linkGroups(m map[string]Info, paths []string) map[string][]string {
	type inode struct{ dev, ino uint64 }
	byInode := make(map[inode][]string)
	for _, p := range paths { // sorted, so each group is too
		i := m[p]
		k := inode{i.Dev, i.Ino}
		byInode[k] = append(byInode[k], p)
	}
	out := make(map[string][]string, len(paths))
	for _, g := range byInode {
		for _, p := range g {
			out[p] = g
		}
	}
	return out
}

// groupsOf formats the distinct groups of set's members, e.g.
// `["/a" "/b"] ["/c"]`.
func groupsOf(set []string, groups map[string][]string) string {
	seen := make(map[string]bool)
	var parts []string
	for _, p := range set {
		if seen[p] {
			continue
		}
		g := groups[p]
		quoted := make([]string, len(g))
		for i, q := range g {
			seen[q] = true
			quoted[i] = fmt.Sprintf("%q", q)
		}
		parts = append(parts, "["+strings.Join(quoted, " ")+"]")
	}
	return strings.Join(parts, " ")
}
