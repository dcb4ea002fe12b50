// Package snapshot implements lazylayer's containerd snapshotter.
//
// It is an overlayfs snapshotter over containerd's snapshot metastore (bbolt)
// that also speaks containerd's remote-snapshot protocol: when Prepare carries
// the target labels of an image layer, the snapshotter obtains the layer
// itself from a FileSystem, commits it under the target name and answers
// ErrAlreadyExists, so containerd neither downloads nor unpacks that layer.
//
// The package knows nothing about registries, FUSE or layer formats: it asks
// the small FileSystem interface it declares, and the composition root in
// cmd/lazylayer-snapshotter wires a concrete implementation. It is not a
// containerd plugin by itself; cmd serves it over gRPC as a proxy plugin.
package snapshot
