# lib.sh: shared by demo.sh, demo-stop.sh and bench.sh. Source it; it starts
# and stops a registry, lazylayer-snapshotter and containerd on loopback with
# all state in one run folder ($RUN), and records each process's PID there.
# shellcheck shell=bash

TOP=${TOP:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
TOOLS=${TOOLS:-$TOP/.tools}
RUN=${RUN:-$TOP/.run/demo}
REGISTRY_ADDR=${REGISTRY_ADDR:-127.0.0.1:5765}
export PATH="$TOOLS/bin:$TOP/bin:$PATH"

CTR_SOCK=$RUN/containerd/containerd.sock
LAZY_SOCK=$RUN/lazylayer/lazylayer.sock

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

ctr() { command ctr --address "$CTR_SOCK" "$@"; }

wait_for() { # wait_for WHAT CMD...: retry CMD for up to 20 s
	local what=$1; shift
	for _ in $(seq 200); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "timed out waiting for $what" >&2
	return 1
}

start_bg() { # start_bg NAME LOG CMD...: start CMD in the background, PID in $RUN/NAME.pid
	local name=$1 logf=$2; shift 2
	"$@" >"$logf" 2>&1 &
	echo $! >"$RUN/$name.pid"
}

start_registry() {
	mkdir -p "$RUN/registry"
	cat >"$RUN/registry/config.yml" <<YML
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $RUN/registry/storage
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
YML
	start_bg registry "$RUN/registry/registry.log" docker-registry serve "$RUN/registry/config.yml"
	wait_for "registry on $REGISTRY_ADDR" curl -fsS "http://$REGISTRY_ADDR/v2/"
}

write_hosts_dir() { # the hosts.toml both lazylayer and ctr read for the registry
	mkdir -p "$RUN/certs.d/$REGISTRY_ADDR"
	cat >"$RUN/certs.d/$REGISTRY_ADDR/hosts.toml" <<TOML
server = "http://$REGISTRY_ADDR"

[host."http://$REGISTRY_ADDR"]
  capabilities = ["pull", "resolve", "push"]
TOML
}

start_lazylayer() {
	mkdir -p "$RUN/lazylayer"
	start_bg lazylayer "$RUN/lazylayer/lazylayer.log" lazylayer-snapshotter \
		--root "$RUN/lazylayer/root" --address "$LAZY_SOCK" --hosts-dir "$RUN/certs.d" \
		--config "$RUN/lazylayer/config.toml" ${LAZYLAYER_LOG_LEVEL:+--log-level "$LAZYLAYER_LOG_LEVEL"}
	wait_for "lazylayer socket" test -S "$LAZY_SOCK"
}

write_lazylayer_config() {
	mkdir -p "$RUN/lazylayer"
	[ -f "$RUN/lazylayer/config.toml" ] || cat >"$RUN/lazylayer/config.toml" <<TOML
# lazylayer-snapshotter configuration (docs/configuration.md)
log_level = "info"

[fetch]
  range_size = "4MiB"
  concurrency = 4
TOML
}

start_containerd() {
	mkdir -p "$RUN/containerd"
	sed -e "s#@ROOT@#$RUN/containerd/root#; s#@STATE@#$RUN/containerd/state#" \
		-e "s#@ADDRESS@#$CTR_SOCK#g; s#@LAZYLAYER@#$LAZY_SOCK#" \
		"$TOP/script/containerd.toml" >"$RUN/containerd/config.toml"
	start_bg containerd "$RUN/containerd/containerd.log" containerd --config "$RUN/containerd/config.toml"
	wait_for "containerd" ctr version
}

stop_pid() { # stop_pid NAME: SIGTERM the recorded process, SIGKILL after 10 s
	local f="$RUN/$1.pid" pid
	[ -f "$f" ] || return 0
	pid=$(cat "$f")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}

unmount_under() { # unmount every mount below $1, deepest first
	local dir mp
	dir=$(realpath -m "$1")
	awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r mp; do
		umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
	done
}

stop_all() {
	if [ -S "$CTR_SOCK" ]; then
		for id in $(ctr task ls -q 2>/dev/null); do ctr task kill -s KILL "$id" >/dev/null 2>&1 || true; done
		sleep 0.5
		for id in $(ctr task ls -q 2>/dev/null); do ctr task rm -f "$id" >/dev/null 2>&1 || true; done
		for id in $(ctr container ls -q 2>/dev/null); do ctr container rm "$id" >/dev/null 2>&1 || true; done
	fi
	stop_pid containerd
	# shims outlive containerd by design; stop the ones of this run folder.
	pkill -f "containerd-shim-runc-v2 .*-address $CTR_SOCK" 2>/dev/null || true
	stop_pid lazylayer
	stop_pid registry
	unmount_under "$RUN"
}
