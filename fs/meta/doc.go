// Package meta builds a layer's metadata tree: the local, read-only
// directory that presents a lazy layer to overlayfs with native metadata.
// A container over lazy layers mounts
//
//	lowerdir=META_n:...:META_1::LOCALDATA::FUSEDATA
//
// where each META tree holds the layer's directories, symlinks, devices,
// fifos, whiteouts and opaque directories for real, and each non-empty
// regular file as an overlay metacopy file: a sparse file of the right size,
// mode, owner, times and extended attributes, with trusted.overlay.metacopy
// and a trusted.overlay.redirect that names the file's data in the
// data-only layers after "::". Overlay looks the data up in those layers, in
// order, when the file is first opened, so stat, readdir and lookup never
// leave the local disk.
//
// Build writes one tree from a list of entries the caller takes from the
// layer's verified index; LowerDir writes the lowerdir option; CheckLower
// and Check guard the mount.
//
// What the kernel requires (Linux 6.18, see the tests):
//
//   - A metacopy file is served from the data-only layers without any mount
//     option only when its META tree is the last lower layer before "::".
//     When any lower layer follows a META tree (a second META tree, or a
//     plain local layer below a lazy one), overlay refuses the file with
//     EPERM ("refusing to follow metacopy origin") unless the mount has
//     metacopy=on (MetacopyOption), which also turns on redirect_dir.
//   - With metacopy=on, a chmod, chown or utime of a lower file in a
//     container copies up only its metadata: the upper directory holds a
//     data-less metacopy file, and every later mount of that upper
//     directory needs metacopy=on too. The stub finds its data by path, so
//     it still reads right once its layer is a plain local tree. Without
//     metacopy=on, such a change copies the whole file up (for a lazy
//     file: fetches it). A write always copies the whole file up.
//   - A redirect is looked up first in every non-data lower layer below the
//     metacopy file, by path, and only then in the data-only layers. Image
//     content in a lower layer at the same path would be served instead of
//     the file's own data. Redirects therefore live under the reserved
//     top-level name RedirectRoot, which Build refuses in a layer and
//     CheckLower refuses in a plain lower layer.
//
// The package does not fetch, verify or place file contents (the data-only
// layers are another package's), does not choose redirect paths (the
// caller generates them, unique per layer, never from image content) and
// does not mount containers. It does not sync what it writes: a tree is
// derived data that the caller rebuilds from the index after a crash.
package meta
