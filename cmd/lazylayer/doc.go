// Command lazylayer is lazylayer's command line for users:
//
//	lazylayer convert [flags] SRC DST   rebuild an image's layers for lazy pulling
//	lazylayer status [--json]           list the layers a running daemon holds
//	lazylayer help [COMMAND]            show usage
//
// convert reads the image (or image index) SRC from its registry, rebuilds
// every layer as eStargz, or as zstd:chunked with --zstdchunked, using the
// estargz library of the stargz-snapshotter project, and pushes the result
// as DST. The image config gets the new layers' diff IDs and keeps
// everything else; manifests and indexes keep their annotations and
// platforms. Progress goes to stderr, one line per layer; the last line on
// stdout is DST@<manifest digest>, for scripts to capture. The result
// depends on SRC and the flags only: the same lazylayer converting the same
// image gives the same digest on any machine. Registry hosts
// and TLS come from containerd's hosts.toml directory (--hosts-dir) and
// credentials from docker's config.json, as for the snapshotter daemon.
//
// status asks lazylayer-snapshotter, over the status.sock next to its API
// socket, for every layer it holds: digest, state (lazy, populating, local),
// bytes held of the compressed size, population's rate, and for a FUSE
// mount still alive, its mountpoint and how many overlays use it.
//
// Each subcommand is a method with the signature
// func(ctx context.Context, args []string) error, listed in commands in
// main.go.
package main
