// Package fusefd owns the FUSE connections of lazylayer's mounts so that
// they outlive the daemon that serves them.
//
// The daemon opens /dev/fuse and mounts with it itself (Mount), so it holds
// the connection's descriptor; go-fuse serves it through its "/dev/fd/N"
// mountpoint (Serve). The INIT request the kernel sent on the connection is
// kept: a later daemon replays it to its own go-fuse server, which then
// serves the same connection, and asks the kernel to send again the
// requests the last daemon read but did not answer (FUSE_NOTIFY_RESEND).
//
// A Holder is a small process that keeps a copy of every descriptor (and
// the INIT request and a note from the layer) while the daemon stops,
// restarts or crashes; the next daemon takes them back over a unix socket.
// Under systemd, a Store keeps them in systemd's file descriptor store
// instead (sd_notify FDSTORE=1; back in LISTEN_FDS), with what a Holder
// keeps besides in a file per connection; no holder process runs then.
//
// It is not a FUSE file system: what a connection serves is the caller's.
package fusefd
