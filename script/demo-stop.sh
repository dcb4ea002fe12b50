#!/usr/bin/env bash
# demo-stop.sh: stop what demo.sh started and unmount everything it mounted.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
stop_all
say "demo stopped; state kept in $RUN (delete it, or run make demo again)"
