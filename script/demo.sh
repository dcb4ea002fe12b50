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

SRC=$REGISTRY_ADDR/lazylayer/demo:gzip
IMAGE=$REGISTRY_ADDR/lazylayer/demo:estargz
say "building and pushing the sample image $SRC (busybox + 96 MiB in 3 layers)"
mkimage -registry "$REGISTRY_ADDR" -image lazylayer/demo:gzip -kind large -size-mib 96 -layers 3
say "lazylayer convert $SRC $IMAGE"
lazylayer convert --hosts-dir "$RUN/certs.d" "$SRC" "$IMAGE"

served() { # bytes the registry served for the demo image's blobs so far
	awk '$7 ~ /^\/v2\/lazylayer\/demo\/blobs\// && $9 ~ /^20/ {n += $10} END {print n + 0}' "$RUN/registry/registry.log"
}
before=$(served)

say "ctr image pull --snapshotter lazylayer $IMAGE"
t0=$(date +%s.%N)
ctr image pull --snapshotter lazylayer --hosts-dir "$RUN/certs.d" "$IMAGE" | tail -n 1
t1=$(date +%s.%N)
say "ctr run --snapshotter lazylayer $IMAGE"
ctr run --rm --snapshotter lazylayer "$IMAGE" demo sh -c 'echo "hello from a container on lazylayer"; ls /'
t2=$(date +%s.%N)
lazy_bytes=$(( $(served) - before ))

say "what happened"
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "pull %.2fs, run %.2fs\n", b - a, c - b }'
total=$(lazylayer status --address "$LAZY_SOCK" --json | awk -F'[:,]' '/"size"/ {n += $2} END {print n + 0}')
echo "the registry served $lazy_bytes bytes of the image's $total layer bytes before the container finished"
echo "layer blobs in containerd's content store: $(ctr content ls | grep -c 'containerd.io/uncompressed=' || true) (lazylayer does the fetching)"
lazylayer status --address "$LAZY_SOCK"

say "waiting for the layers to download in the background and turn local"
for _ in $(seq 120); do
	lazylayer status --address "$LAZY_SOCK" --json | grep -qE '"state": "(lazy|populating)"' || break
	sleep 0.5
done
lazylayer status --address "$LAZY_SOCK"
grep 'layer is local' "$RUN/lazylayer/lazylayer.log" |
	sed -E 's/.*elapsed=([^ ]+).*fetched=([0-9]+).*layer="?([^ "]+).*/  \3 local after \1, \2 bytes fetched in the background/' || true

say "a container started now mounts the local directories: no FUSE in its overlay"
ctr run -d --snapshotter lazylayer "$IMAGE" demo-local sleep 30 >/dev/null
awk '$5 ~ /demo-local\/rootfs$/' /proc/self/mountinfo | grep -o 'lowerdir=[^,]*' | tr ':' '\n' | sed 's/^/  /'
ctr task kill -s KILL demo-local >/dev/null 2>&1 || true
sleep 0.5
ctr task rm -f demo-local >/dev/null 2>&1 || true
ctr container rm demo-local >/dev/null 2>&1 || true
cat <<TXT

The demo keeps running. Try:
  $TOOLS/bin/ctr --address $CTR_SOCK run --rm -t --snapshotter lazylayer $IMAGE sh1 sh
Logs: $RUN/{registry/registry.log,lazylayer/lazylayer.log,containerd/containerd.log}
Stop everything and unmount: make demo-stop
TXT
