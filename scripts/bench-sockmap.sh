#!/usr/bin/env bash
# Does the in-kernel relay (issue #16) beat holdfast's user-space relays here?
#
#   scripts/bench-sockmap.sh [--quick] [--no-build] [-- BENCH FLAGS...]
#
# Builds holdfast and examples/sockmap_bench.rs (release) and runs the bench: 1000 sessions
# per variant (direct, sockmap, sockmap-v, holdfast --relay copy, holdfast --relay splice),
# closed-loop 64 B round trips spread over them, one bulk stream, and the round trips again
# while one more session streams bulk through the same proxy (does a busy session slow the
# others?); whole-machine CPU from
# /proc/stat around each run; variants interleaved, 5 rounds, medians with the spread. See
# the top of examples/sockmap_bench.rs for what each number is. Needs root for the sockmap
# variants (they are reported unavailable otherwise). The output is also kept under
# target/bench/. --quick: 200 sessions, 2000 round trips, 128 MiB, 1 round.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=1
ARGS=(--sessions 1000 --round-trips 20000 --size 64 --bulk-mib 1024 --rounds 5)
while (($#)); do
    case $1 in
        --quick) ARGS=(--sessions 200 --round-trips 2000 --size 64 --bulk-mib 128 --rounds 1) ;;
        --no-build) BUILD=0 ;;
        --) shift; ARGS+=("$@"); break ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
cd "$ROOT"
if ((BUILD)); then
    cargo build --release --bin holdfast --example sockmap_bench
fi
OUT=target/bench/sockmap-$(date +%Y%m%d-%H%M%S).txt
mkdir -p target/bench
{
    echo "# $(uname -srm), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    target/release/examples/sockmap_bench --holdfast target/release/holdfast "${ARGS[@]}"
    echo "# load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT"
echo "(kept in $OUT)"
