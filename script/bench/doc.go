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
// Each run starts cold: new daemon state directories, caches dropped. It
// records the time from `ctr image pull` to the first output line of
// `ctr run`, the bytes and requests the registry side served until then,
// the time until the image is fully local, steady-state reads inside a
// container, and the daemons' peak RSS and CPU time. Results are kept as
// JSON (results.json in the work directory) and rendered into markdown
// and PNG charts; -report renders a saved file again without measuring.
//
//	lazylayer-bench [-quick] [-images python,gcc,synthetic] [-profiles unshaped,100mbit-20ms]
//	                [-modes overlayfs,lazylayer,lazylayer-estargz] [-runs 5]
//	lazylayer-bench -report results.json
//
// It is not a general benchmarking tool: it knows lazylayer's images,
// profiles and daemons, and it expects a Debian 12 machine set up by
// script/setup.sh.
package main
