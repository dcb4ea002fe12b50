#!/usr/bin/env bash
# bench.sh: `make bench` and `make bench-quick`. Builds the benchmark program
# (script/bench) and runs it as root from the repository root; any argument
# goes to it (--quick, -images, -profiles, -modes, -runs, -report FILE,
# -before FILE; see docs/benchmarks.md). The Makefile has already run
# setup.sh and built bin/.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${TOOLS:-$TOP/.tools}
cd "$TOP"
if [ "$(id -u)" != 0 ]; then
	echo "bench.sh: run as root (containerd, overlay mounts, network namespaces)" >&2
	exit 1
fi
mkdir -p "$TOOLS/bin"
# script/bench is a Go module of its own (its own go.mod), so the peers it
# builds and its plotting library stay out of lazylayer's dependencies.
# The peers' daemons (stargz-snapshotter, soci-snapshotter) are wired from
# their library packages in script/bench/peers/.
(cd script/bench && go build -o "$TOOLS/bin/lazylayer-bench" . &&
	go build -o "$TOOLS/bin/lazylayer-bench-stargz" ./peers/stargz &&
	go build -o "$TOOLS/bin/lazylayer-bench-soci" ./peers/soci)
exec "$TOOLS/bin/lazylayer-bench" -top "$TOP" "$@"
