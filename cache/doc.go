// Package cache is lazylayer's chunk store: a durable, content-addressed store
// of verified chunks on local disk, which lazy FUSE layers read through.
//
// A chunk is a piece of a file's uncompressed bytes, named by its sha256
// digest. A [Store] keeps each chunk in its own file, dir/sha256/<first two
// hex digits>/<hex>. A chunk is written to dir/staging and renamed into
// place, so a reader never sees a partial chunk; [Open] removes what a crash
// left in dir/staging and indexes the chunks already there from their
// directory entries, without reading them.
//
// Bytes are verified against their digest before they are stored ([Store.Put])
// or handed out after a fetch ([Store.Load]); a chunk that fails verification
// is neither stored nor returned. Reading a stored chunk back does not hash it
// again: the store is a root-owned local directory, so its bytes are trusted.
// A chunk file that is missing, shorter or longer than the store recorded, or
// unreadable, counts as a miss and is removed.
//
// Chunk files are not synced one by one. If the daemon dies, the kernel still
// writes every chunk file out whole; if the machine goes down, a chunk written
// shortly before may come back short or empty. So Open keeps the chunks it
// finds only if the last Store to use the directory was closed (Close syncs
// the filesystem) or the machine has not restarted since that Store's Open
// (the Linux boot ID is unchanged); otherwise it discards them.
//
// A store may be bounded in bytes. When a new chunk would exceed the bound,
// the least recently used chunks are evicted until it fits. Use is recorded in
// memory on every hit; at Open it is taken from the files' access and
// modification times, whichever is later. A chunk larger than the bound is
// never stored.
//
// A chunk that Load fetched but cannot write (a full disk, a quota, a
// read-only filesystem) is kept in memory instead, within a bound, so that it
// is not fetched again on every read; the store then stops trying the disk
// for a while, and logs once when this starts and once when it ends (see
// [Store.Load]).
//
// [Store.Load] is the read-through entry point: it returns a list of chunks,
// reading those in the store and fetching the rest with one call of the
// caller's fetch function. Concurrent Loads of the same chunk share one fetch.
// The fetch function may hand over each chunk as soon as it has its bytes:
// the Loads waiting for that chunk get it then, not when the whole fetch is
// over. [Store.LoadFirst] returns once the first of its chunks are there and
// leaves the fetch of the others running.
//
// What the package is not: it does not talk to registries (the caller's fetch
// function does), it knows nothing of layers, files or tables of contents, and
// it does not know which layers share a chunk, so [Store.Delete] removes a
// chunk for all of them. One directory belongs to one Store at a time: Open
// takes an exclusive lock on dir/lock. The package imports no other lazylayer
// package.
package cache
