// Package remote turns an image reference and a descriptor into a registry blob
// that serves any byte range.
//
// A [Resolver] finds the registry hosts for a reference the way containerd does:
// containerd's hosts.toml directory layout gives mirrors, plain-HTTP endpoints and
// TLS settings, and docker's config.json (with its credential helpers) gives the
// credentials. It fetches and verifies image manifests ([Resolver.Manifest]) and
// opens blobs ([Resolver.Blob]). A [Blob] reads one byte range with a ranged GET
// ([Blob.ReadRange]) or streams the whole blob with parallel ranged GETs
// ([Blob.Stream]). Every request is retried on transient failures with bounded,
// jittered exponential backoff, and a reply body that breaks mid-way is resumed
// from where it broke.
//
// Errors say which of two things went wrong: [ErrUnavailable] (the bytes could
// not be fetched; another source may have them) or [ErrBadData] (the registry
// replied with something wrong). Use errors.Is to tell them apart.
//
// What remote is not: it does not verify blob digests (a blob's reader returns
// the registry's bytes; the caller verifies them), it does not cache, and it
// does not resolve tags or image indexes to manifests. It imports no other
// lazylayer package.
package remote
