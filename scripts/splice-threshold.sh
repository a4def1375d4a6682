#!/usr/bin/env bash
# Where does splice(2) become cheaper than copying, for holdfast's relay?
#
#   scripts/splice-threshold.sh [--quick] [--rounds N] [--out DIR] [--no-build] [--with-sockmap]
#
# holdfast --relay auto copies a direction until one read returns >= 16 KiB
# (AUTO_SPLICE_THRESHOLD), then splices, and goes back to copying after 4 splices in a row
# of < 4 KiB (AUTO_SMALL_SPLICES).
# This script measures the cost the switch is supposed to follow: one holdfast per relay mode
# (copy, splice, and auto for reference; --workers 1) in front of one echo backend, and for
# each message size a fixed-rate request/response run (same offered load for every mode, so
# the proxy's CPU is directly comparable), plus a bulk stream. Proxy CPU is utime+stime from
# /proc/PID/stat around each run, reported per round trip and per GB relayed (both
# directions: request and echo). Modes alternate within a round, rounds >= 3, medians.
# Every run also records the whole machine's busy CPU (/proc/stat) around it.
#
# --with-sockmap (root only): a `sockmap` column, examples/sockmap_proxy.rs (issue #16's
# in-kernel relay, a benchmark instrument) in front of the same echo backend. Its own CPU is
# near zero by construction, so compare the whole-machine columns for it. So that those are the
# work and not the latency generator spinning between sends (about a core), the fixed-rate
# runs of every mode then use `--no-spin`: their p99 becomes mostly the generator's send
# lateness (up to ~1 ms), the same for every mode.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
ROUNDS=
OUT=
BUILD=1
WITH_SOCKMAP=0
while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --with-sockmap) WITH_SOCKMAP=1 ;;
        -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ((QUICK)); then
    ROUNDS=${ROUNDS:-1} DUR=1s WARM=0.2s
else
    ROUNDS=${ROUNDS:-3} DUR=5s WARM=0.5s
fi
SIZES=(512 2048 4096 8192 12288 16384 32768 65536)
CONNS=50
RATE=5000 # 5000 req/s x 64 KiB = 328 MB/s each way at the largest size
MODES=(copy splice auto)
SPIN=()
if ((WITH_SOCKMAP)); then
    SPIN=(--no-spin)
    (($(id -u) == 0)) || { echo "error: --with-sockmap needs root (CAP_BPF and CAP_NET_ADMIN)" >&2; exit 2; }
    MODES+=(sockmap)
fi

OUT=${OUT:-$ROOT/target/bench/splice-threshold-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/runs" || exit 1
WORK=$OUT/work
mkdir -p "$WORK"

# shellcheck source=bench/lib.sh
source "$ROOT/scripts/bench/lib.sh"
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

LOAD_START=$(loadavg)
log "load average at start: $LOAD_START"
ensure_tools || exit 1
if ((BUILD)); then build_release || exit 1; fi
if ((WITH_SOCKMAP && BUILD)); then
    log "cargo build --release --example sockmap_proxy"
    (cd "$ROOT" && cargo build --release --quiet --example sockmap_proxy) || exit 1
fi
BENCH_IP=$(pick_bench_ip)

start_echo echo || exit 1
declare -A PID ADDR
ensure_mode() {
    local m=$1
    if [[ -n ${PID[$m]:-} ]] && kill -0 "${PID[$m]}" 2>/dev/null; then
        return 0
    fi
    [[ -n ${PID[$m]:-} ]] && log "WARNING: the $m proxy died; restarting it"
    if [[ $m == sockmap ]]; then
        start_ready "$WORK/sockmap.log" "sockmap_proxy listening on" 10 \
            "$BIN/examples/sockmap_proxy" --listen "$BENCH_IP:0" --backend "$ECHO_ADDR" || return 1
        PROXY_PID=$STARTED_PID
        PROXY_ADDR=$(listen_addr_of "$WORK/sockmap.log")
    else
        start_holdfast "hf-$m" "$m" "$ECHO_ADDR" || return 1
    fi
    PID[$m]=$PROXY_PID
    ADDR[$m]=$PROXY_ADDR
}

# Busy CPU seconds of the whole machine so far (/proc/stat: every field but idle and iowait).
machine_busy_s() {
    awk -v tck="$CLK_TCK" '/^cpu / { b = 0; for (i = 2; i <= 9; i++) if (i != 5 && i != 6) b += $i; printf "%.2f\n", b / tck; exit }' /proc/stat
}
for m in "${MODES[@]}"; do ensure_mode "$m" || exit 1; done

machine_info >"$OUT/machine.txt"
{
    echo "rounds=$ROUNDS"
    echo "quick=$QUICK"
    echo "loadavg_start=$LOAD_START"
    echo "command_size=holdfast-load --json latency --conns $CONNS --rate $RATE --size SIZE --duration $DUR --warmup $WARM ${SPIN[*]} --target PROXY"
    echo "command_bulk=holdfast-load --json bulk --streams 1 --mode echo --duration $DUR --target PROXY"
    echo "command_proxy=holdfast --listen $BENCH_IP:0 --backend $ECHO_ADDR --workers 1 --relay {copy,splice,auto}"
    ((WITH_SOCKMAP)) && echo "command_sockmap=sockmap_proxy --listen $BENCH_IP:0 --backend $ECHO_ADDR (examples/sockmap_proxy.rs)"
    echo "modes=${MODES[*]}"
} >"$OUT/params.txt"

run() { # ROUND CASE MODE
    local r=$1 c=$2 m=$3 base="$OUT/runs/$1.$2.$3" rc=0 c0 c1 m0 m1 err=
    local -a args
    if [[ $c == bulk ]]; then
        args=(bulk --streams 1 --mode echo --duration "$DUR")
    else
        args=(latency --conns "$CONNS" --rate "$RATE" --size "$c" --duration "$DUR" --warmup "$WARM" "${SPIN[@]}")
    fi
    if ! ensure_mode "$m"; then
        printf '{"round":%s,"case":"%s","mode":"%s","error":"could not start holdfast"}\n' "$r" "$c" "$m" >"$base.meta.json"
        return
    fi
    c0=$(cpu_seconds "${PID[$m]}")
    m0=$(machine_busy_s)
    timeout -s INT -k 5 60 "$BIN/holdfast-load" --json "${args[@]}" --target "${ADDR[$m]}" \
        >"$base.client.json" 2>"$base.err" || rc=$?
    m1=$(machine_busy_s)
    c1=$(cpu_seconds "${PID[$m]}")
    kill -0 "${PID[$m]}" 2>/dev/null || err="holdfast died during the run"
    ((rc != 0)) && [[ -z $err ]] && err="client exit status $rc"
    printf '{"round":%s,"case":"%s","mode":"%s","exit":%s,"cpu_before_s":%s,"cpu_after_s":%s,"machine_busy_before_s":%s,"machine_busy_after_s":%s,"error":"%s"}\n' \
        "$r" "$c" "$m" "$rc" "$c0" "$c1" "$m0" "$m1" "$err" >"$base.meta.json"
    log "round $r size $c relay $m: machine cpu $(awk -v a="$m0" -v b="$m1" 'BEGIN{printf "%.2fs", b-a}') proxy cpu $(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.2fs", b-a}') ${err:+ERROR $err}"
}

CASES=("${SIZES[@]}" bulk)
n=${#MODES[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS, load average $(loadavg)"
    for c in "${CASES[@]}"; do
        for ((i = 0; i < n; i++)); do
            run "$r" "$c" "${MODES[$(((i + r - 1) % n))]}"
        done
    done
done
echo "loadavg_end=$(loadavg)" >>"$OUT/params.txt"
bench_cleanup
echo
python3 "$ROOT/scripts/bench/threshold_report.py" "$OUT"
echo
echo "(raw JSON and per-round values: $OUT)"
