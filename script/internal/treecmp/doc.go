// Package treecmp compares two directory trees attribute by attribute, for
// tests that check a layer was applied faithfully (for example a container
// root filesystem built by lazylayer against one built by containerd's
// overlayfs snapshotter, both mounted read-only).
//
// [Snapshot] records, for every path under a root: file type, full mode
// (with setuid, setgid and sticky bits), owner, size, a sha256 of regular
// file content, symlink target, every extended attribute (trusted.* and
// security.* included), device number, mtime in nanoseconds and the inode
// identity. [Diff] turns two snapshots into human-readable differences,
// including hardlink groups that are split or joined differently. [Compare]
// does both.
//
// It walks with directory file descriptors (openat, fstatat), so paths longer
// than PATH_MAX and names that are not UTF-8 are handled, and it hashes
// content in a stream. It never follows symlinks and never opens anything
// but regular files and directories. It is not a general diff tool: it
// reports what differs, not how to reconcile it.
package treecmp
