// Package extract unpacks an image layer blob into a directory in the form
// overlayfs reads as a lower layer, verifying it on the way.
//
// The blob is untrusted: its digest (and, when known, the digest of its
// uncompressed tar) is checked, and a tar entry that would leave the layer
// root — an absolute or "../" path, a hard link target outside the layer, or
// an entry written through a symlink the same layer created — stops the
// extraction with an error that names it. So does what would cost far more
// than its bytes in the blob: a sparse file, a name longer than PATH_MAX or
// deeper than 256 components, a zstd window over 128 MiB. Extraction itself
// is containerd's archive package, with whiteouts converted to overlay's
// form, so a tree is byte for byte what containerd's overlayfs snapshotter
// would hold.
//
// It does not fetch anything or decide where trees live; fs/layer does.
package extract
