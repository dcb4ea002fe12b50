#!/usr/bin/env bash
# demo.sh: start a registry, containerd and lazylayer on loopback, push a
# sample image, pull and run it through lazylayer, and show what happened.
# Everything lives in .run/demo; `make demo-stop` stops it all. Run as root.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

say "stopping an earlier demo, if any"
stop_all
rm -rf "$RUN"
mkdir -p "$RUN"

say "starting registry ($REGISTRY_ADDR), lazylayer and containerd in $RUN"
start_registry
write_hosts_dir
write_lazylayer_config
start_lazylayer
start_containerd

IMAGE=$REGISTRY_ADDR/lazylayer/demo:latest
say "building and pushing the sample image $IMAGE"
mkimage -registry "$REGISTRY_ADDR" -image lazylayer/demo:latest -kind large -size-mib 96 -layers 3

say "ctr image pull --snapshotter lazylayer $IMAGE"
t0=$(date +%s.%N)
ctr image pull --snapshotter lazylayer --hosts-dir "$RUN/certs.d" "$IMAGE" | tail -n 3
t1=$(date +%s.%N)
say "ctr run --snapshotter lazylayer $IMAGE"
ctr run --rm --snapshotter lazylayer "$IMAGE" demo sh -c 'echo "hello from a container on lazylayer"; cat /etc/os-release 2>/dev/null | head -n 1; ls /'
t2=$(date +%s.%N)

say "what happened"
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "pull %.2fs, run %.2fs\n", b - a, c - b }'
echo "layers lazylayer fetched and unpacked itself (from its log):"
grep 'layer fetched and unpacked' "$RUN/lazylayer/lazylayer.log" |
	sed -E 's/.*bytes=([0-9]+).*elapsed=([^ ]+).*layer="?([^ "]+).*/  \3  \1 bytes in \2/' || echo "  none"
if grep -q 'containerd will pull' "$RUN/lazylayer/lazylayer.log"; then
	echo "layers lazylayer left to containerd (fallback), and why:"
	grep 'containerd will pull' "$RUN/lazylayer/lazylayer.log" | sed 's/^/  /'
fi
ranged=$(grep -cE '"GET /v2/lazylayer/demo/blobs/[^ ]+ HTTP/[0-9.]+" 206 ' "$RUN/registry/registry.log" || true)
echo "registry: $ranged ranged blob GETs answered 206 Partial Content (parallel range requests)"
echo "layer blobs in containerd's content store: $(ctr content ls | grep -c 'containerd.io/uncompressed=' || true) (lazylayer did the fetching)"
echo "snapshots lazylayer holds:"
ctr snapshots --snapshotter lazylayer ls | sed 's/^/  /'
cat <<TXT

The demo keeps running. Try:
  $TOOLS/bin/ctr --address $CTR_SOCK run --rm -t --snapshotter lazylayer $IMAGE sh1 sh
Logs: $RUN/{registry/registry.log,lazylayer/lazylayer.log,containerd/containerd.log}
Stop everything and unmount: make demo-stop
TXT
