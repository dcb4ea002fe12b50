// Package fs holds everything lazylayer does with a layer's bytes once they
// leave the registry: extraction into a local tree (fs/extract) and the
// per-layer lifecycle behind the snapshotter's FileSystem (fs/layer).
//
// It does not talk gRPC or know containerd's metastore; the snapshot package
// asks it for layers through a small interface.
package fs
