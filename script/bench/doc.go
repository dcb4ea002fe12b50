// Command lazylayer-bench measures lazylayer against containerd's own
// overlayfs snapshotter and writes docs/benchmarks.md and its charts.
//
// `make bench` (script/bench.sh) builds and runs it as root. It prepares
// what it needs and caches it under .tools/bench-cache: Debian root
// filesystems made with debootstrap and apt-get in a chroot, and a
// registry whose storage holds the pushed images. Then it creates a
// network namespace, re-runs itself inside it, and there starts the
// registry, a delaying and counting TCP proxy in front of it (the "link"),
// and, for every measured run, a fresh containerd and lazylayer-snapshotter.
// Bandwidth is shaped with tc on the namespace's loopback; round-trip
// latency is added by the proxy.
//
// Each run starts cold: new daemon state directories (on an ext4 file
// system with a journal made for the invocation, see disk.go), caches
// dropped. It
// records the time from `ctr image pull` to the first output line of
// `ctr run`, the bytes and requests the registry side served until then,
// the time until the image is fully local, steady-state reads inside a
// container, and the daemons' peak RSS and CPU time. The held mode runs
// lazylayer with population held (lazy.populate = "manual"): it measures
// the container started lazily while every layer is lazy, releases
// population, and measures it again once they are local, counting the
// FUSE requests the daemon answers meanwhile; every lazylayer run records
// how long each layer's lazy mount took, from the daemon's log. Results
// are kept as JSON (results.json in the work directory) and rendered into
// markdown and PNG charts; -report renders a saved file again without
// measuring, and -before adds an earlier file's figures on lazily started
// containers and lazy mounts.
//
//	lazylayer-bench [-quick] [-images python,gcc,synthetic] [-profiles unshaped,100mbit-20ms]
//	                [-modes overlayfs,lazylayer,lazylayer-estargz,lazylayer-held] [-runs 5] [-before old.json]
//	lazylayer-bench -report results.json [-before old.json]
//
// It is not a general benchmarking tool: it knows lazylayer's images,
// profiles and daemons, and it expects a Debian 12 machine set up by
// script/setup.sh.
package main
