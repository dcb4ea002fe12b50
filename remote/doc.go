// Package remote talks to OCI registries for lazylayer: it resolves image
// references, fetches manifests and indexes, reads blobs by byte range, and
// pushes blobs and manifests.
//
// A [Resolver] finds the registry hosts for a reference the way containerd does:
// containerd's hosts.toml directory layout gives mirrors, plain-HTTP endpoints and
// TLS settings, and docker's config.json (with its credential helpers) gives the
// credentials. [Resolver.Resolve] turns a tag or digest into the descriptor of
// the manifest or index it names. [Resolver.Manifest] and [Resolver.Index] fetch
// an image manifest or an index, verify its bytes against its digest and decode
// it. [Resolver.Blob] opens a blob: a [Blob] reads one byte range with a ranged
// GET ([Blob.ReadRange]) or streams the whole blob with parallel ranged GETs
// ([Blob.Stream]). [Resolver.PushBlob] and [Resolver.PushManifest] upload to the
// first host configured with the push capability, as containerd does. Every
// request is retried on transient failures with bounded, jittered exponential
// backoff, and a reply body that breaks mid-way is resumed from where it broke.
//
// Errors say which of three things went wrong: [ErrUnavailable] (the bytes
// could not be fetched or pushed; another source may do better),
// [ErrNotFound] (every registry host asked answered that it does not have
// them) or [ErrBadData] (the registry replied with something wrong). Use
// errors.Is to tell them apart.
//
// What remote is not: it does not verify blob digests (a blob's reader returns
// the registry's bytes; the caller verifies them), it does not cache, it does
// not choose a platform from an index (the caller walks it), and it does not
// mount blobs across repositories. It imports no other lazylayer package.
package remote
