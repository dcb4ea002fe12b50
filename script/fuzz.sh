#!/usr/bin/env bash
# fuzz.sh: `make fuzz`. Runs every `go test -fuzz` target of the module, one
# after the other, and fails if one finds a failing input or runs fewer than
# FUZZMINRATE inputs a second. Run it as root: FuzzLayer extracts whiteouts
# (device nodes) and trusted.* xattrs, which fail early otherwise.
#
#   FUZZTIME      how long each target runs (default 10m; 30s, 1h, ...)
#   FUZZPARALLEL  fuzzing processes per target (default 2, one per core of
#                 the 2-core machines this runs on)
#   FUZZMINIMIZE  runs go test may spend minimizing each new input (default
#                 1000)
#   FUZZMINRATE   the fewest inputs a second a target may run (default 100)
#
# Minimization is bounded by a count, not by -fuzzminimizetime's default of
# 60 s. go test minimizes every input that reaches new code, with O(n²) runs
# for n bytes; for FuzzLayer, a tar of a few KiB at about a millisecond a
# run, that takes the whole minute, and when a time limit runs out go test
# kills the worker and drops every run it made from the count. That was the
# "stall" of FuzzLayer (7 inputs in 3 minutes). A count limit ends in the
# worker, which reports its runs.
#
# A failing input is saved by go test under the package's
# testdata/fuzz/<Target>/; `go test -run <Target>/<file> ./<pkg>` replays it.
# Each target's full output is kept in $TOOLS/fuzz/<Target>.log.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${TOOLS:-$TOP/.tools}
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-10m}
FUZZPARALLEL=${FUZZPARALLEL:-2}
FUZZMINIMIZE=${FUZZMINIMIZE:-1000}
FUZZMINRATE=${FUZZMINRATE:-100}
cd "$TOP"
logdir="$TOOLS/fuzz"
mkdir -p "$logdir"

# seconds converts go test's elapsed time (59s, 10m0s, 1h2m3s) to seconds.
seconds() {
	awk -v d="$1" 'BEGIN {
		s = 0
		while (match(d, /^[0-9.]+[hms]/)) {
			n = substr(d, 1, RLENGTH - 1); u = substr(d, RLENGTH, 1)
			s += n * (u == "h" ? 3600 : u == "m" ? 60 : 1)
			d = substr(d, RLENGTH + 1)
		}
		print s
	}'
}

# Only the packages that declare a fuzz target are built, so that a package
# elsewhere that does not compile at the moment does not stop the others.
mapfile -t pkgs < <(git ls-files --cached --others --exclude-standard -- '*_test.go' |
	xargs -r grep -l '^func Fuzz' | xargs -r -n1 dirname | sort -u | sed 's|^|./|')
if [ ${#pkgs[@]} -eq 0 ]; then
	echo "fuzz.sh: no fuzz targets found" >&2
	exit 1
fi

failed=()
summary=()
for pkg in "${pkgs[@]}"; do
	mapfile -t targets < <($GO test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true)
	if [ ${#targets[@]} -eq 0 ]; then
		echo "fuzz.sh: $pkg declares a fuzz target but go test -list finds none" >&2
		failed+=("$pkg")
		continue
	fi
	for target in "${targets[@]}"; do
		log="$logdir/$target.log"
		echo "== $pkg $target: -fuzztime $FUZZTIME -parallel $FUZZPARALLEL -fuzzminimizetime ${FUZZMINIMIZE}x"
		rc=0
		# -vet=off: vet is make lint's job, and a vet hiccup must not read as
		# a failing input.
		$GO test -vet=off -run '^$' -fuzz "^$target\$" -fuzztime "$FUZZTIME" -parallel "$FUZZPARALLEL" \
			-fuzzminimizetime "${FUZZMINIMIZE}x" "$pkg" >"$log" 2>&1 || rc=$?
		last=$(grep -E '^fuzz: elapsed: .*, execs: [0-9]+' "$log" | tail -n1 || true)
		execs=$(sed -nE 's/.*execs: ([0-9]+) .*/\1/p' <<<"$last")
		elapsed=$(sed -nE 's/^fuzz: elapsed: ([0-9hms.]+),.*/\1/p' <<<"$last")
		interesting=$(sed -nE 's/.*new interesting: ([0-9]+).*/\1/p' <<<"$last")
		secs=$(seconds "${elapsed:-0s}")
		rate=$(awk -v n="${execs:-0}" -v s="$secs" 'BEGIN { printf "%d", (s > 0 ? n / s : 0) }')
		line="$target ($pkg): ${execs:-0} execs in ${elapsed:-?} = $rate/s, new interesting: ${interesting:-0}"
		if [ "$rc" -ne 0 ]; then
			line="$line: FAILED (go test exit $rc; log $log)"
			failed+=("$target")
			tail -n 30 "$log" | sed 's/^/    /'
		elif [ "$rate" -lt "$FUZZMINRATE" ]; then
			line="$line: FAILED (under $FUZZMINRATE/s; log $log)"
			failed+=("$target")
		fi
		echo "$line"
		summary+=("$line")
	done
done

echo "== fuzz summary (FUZZTIME=$FUZZTIME, FUZZPARALLEL=$FUZZPARALLEL)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz.sh: failed: ${failed[*]}" >&2
	exit 1
fi
