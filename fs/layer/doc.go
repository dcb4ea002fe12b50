// Package layer turns image layers named by containerd's remote-snapshot
// labels into verified local directory trees: it resolves the layer in the
// image manifest, streams the blob from the registry with parallel ranged
// requests, and extracts it with fs/extract. Layers above the one containerd
// asked for are fetched ahead, concurrently; for lazy layers, their TOCs
// are read ahead.
//
// It implements the snapshot package's FileSystem. It does not know the
// snapshot metastore, gRPC or containerd's mounts.
package layer
