// Package testimage builds OCI images from a declarative spec and pushes them
// to a registry over the OCI distribution HTTP API.
//
// It is test and benchmark infrastructure for lazylayer's end-to-end tests and
// demo: an [Image] is a list of [Layer]s, each a list of tar [Entry]s written
// exactly in the order given, with the compression chosen per layer. Whiteouts
// and opaque markers are ordinary entries the caller lists (see [Whiteout] and
// [Opaque]); [RawLayer] pushes tar bytes verbatim, for malformed or malicious
// layers. [Push] streams big layers through temporary files, so multi-GiB files
// need little memory.
//
// [Tricky], [Busybox] and [Large] are the sample images the tests and
// benchmarks use.
//
// It is not a general image builder: it talks plain HTTP without
// authentication (a loopback test registry), builds linux/amd64 images only,
// and never reads images back except to check them in its own tests.
package testimage
