// Package lazy serves an eStargz or zstd:chunked layer over FUSE before it
// is downloaded: the tree comes from the layer's table of contents (TOC),
// verified against the digest in the image manifest, and file contents are
// fetched from the registry on first read, chunk by chunk, each chunk
// verified against its TOC digest and kept in the chunk cache.
//
// The tree is what overlayfs expects of a lower layer (whiteouts as 0/0
// character devices, opaque directories with trusted.overlay.opaque), read
// only, with stable inode numbers and long kernel cache timeouts. It is
// served with go-fuse's raw API so that FUSE node ids follow from the
// index: a daemon that takes a mount's FUSE connection over from another
// (see fs/fusefd and Options.Handover) answers the kernel's ids as they
// are.
//
// It does not decide which layers are lazy or where they are mounted; the
// fs/layer package does.
package lazy
