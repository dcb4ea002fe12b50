#!/usr/bin/env bash
# setup.sh installs everything lazylayer's demo, tests and benchmarks need on a
# Debian 12 machine, as root. It is idempotent: what is already there is kept.
#
#   apt:     runc, docker-registry, fuse3, busybox-static, debootstrap, ...
#   go:      containerd, ctr and containerd-shim-runc-v2 (CONTAINERD_VERSION)
#            and crictl (CRICTL_VERSION) built into $TOOLS/bin
set -euo pipefail

TOOLS=${TOOLS:-$(cd "$(dirname "$0")/.." && pwd)/.tools}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
CRICTL_VERSION=${CRICTL_VERSION:-v1.37.0}
APT_PACKAGES=(runc docker-registry fuse3 busybox-static debootstrap attr iproute2 curl ca-certificates systemd)

log() { printf '[setup] %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	# Debian's docker-registry package starts a registry on :5000 as a service;
	# lazylayer runs its own registries on loopback, so keep that one off.
	if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
		systemctl disable --now docker-registry >/dev/null 2>&1 || true
	fi
fi

mkdir -p "$TOOLS/bin"
stamp="$TOOLS/bin/.containerd-$CONTAINERD_VERSION"
if [ ! -f "$stamp" ] || [ ! -x "$TOOLS/bin/containerd" ]; then
	log "go install containerd $CONTAINERD_VERSION into $TOOLS/bin"
	GOBIN="$TOOLS/bin" GOFLAGS=-mod=mod CGO_ENABLED=1 go install -tags "no_btrfs no_devmapper no_zfs" \
		"github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
		"github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
	touch "$stamp"
fi
# crictl drives containerd's CRI as a Kubernetes operator would (script/e2e/cri*_test.go).
stamp="$TOOLS/bin/.crictl-$CRICTL_VERSION"
if [ ! -f "$stamp" ] || [ ! -x "$TOOLS/bin/crictl" ]; then
	log "go install crictl $CRICTL_VERSION into $TOOLS/bin"
	GOBIN="$TOOLS/bin" GOFLAGS=-mod=mod CGO_ENABLED=0 go install \
		"sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
	touch "$stamp"
fi
log "tools ready in $TOOLS/bin"
