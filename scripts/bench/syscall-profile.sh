#!/usr/bin/env bash
# Syscalls per unit of work, holdfast vs HAProxy, counted with perf's syscall tracepoints
# (cheap enough not to distort the run, unlike strace), plus proxy CPU from /proc/PID/stat
# and, with --record, where that CPU goes (perf record -e cpu-clock, top symbols).
#
#   scripts/bench/syscall-profile.sh [--record] [--duration 3s] SCENARIO...
#
# SCENARIO: connrate | reqrate | lat64 | lat16k | bulk1 (same client commands as
# scripts/bench-vs-haproxy.sh). Variants: holdfast auto and copy (--workers 1), HAProxy
# default and splice (nbthread 1), one echo backend. Needs perf (apt-get install linux-perf)
# and run as root. Used for the profile section of docs/benchmarks.md.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RECORD=0
DUR=3s
SCEN=()
while (($#)); do
    case $1 in
        --record) RECORD=1 ;;
        --duration) DUR=$2; shift ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) SCEN+=("$1") ;;
    esac
    shift
done
((${#SCEN[@]})) || { echo "usage: $0 [--record] SCENARIO..." >&2; exit 2; }
command -v perf >/dev/null || { echo "error: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/holdfast-syscalls.XXXXXX)
# shellcheck source=lib.sh
source "$ROOT/scripts/bench/lib.sh"
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

SYSCALLS=(accept4 socket connect close shutdown setsockopt getsockopt getpeername fcntl
    epoll_wait epoll_pwait epoll_ctl recvfrom sendto read write readv writev recvmsg sendmsg
    splice pipe2)
EVENTS=$(printf 'syscalls:sys_enter_%s,' "${SYSCALLS[@]}")
EVENTS=${EVENTS%,}

BENCH_IP=$(pick_bench_ip)
start_echo echo || exit 1
declare -A PID ADDR
for v in hf-auto hf-copy ha-default ha-splice; do
    case $v in
        hf-*) start_holdfast "$v" "${v#hf-}" "$ECHO_ADDR" || exit 1 ;;
        ha-*) start_haproxy "$v" "${v#ha-}" "$ECHO_ADDR" || exit 1 ;;
    esac
    PID[$v]=$PROXY_PID
    ADDR[$v]=$PROXY_ADDR
done

client_args() {
    case $1 in
        connrate) echo "connect-rate --concurrency 32 --source-ips 200 --duration $DUR" ;;
        reqrate) echo "latency --conns 100 --rate 2000000 --size 64 --duration $DUR --warmup 0s --drain 0s" ;;
        lat64) echo "latency --conns 100 --rate 10000 --size 64 --duration $DUR" ;;
        lat16k) echo "latency --conns 100 --rate 10000 --size 16384 --duration $DUR" ;;
        bulk1) echo "bulk --streams 1 --mode echo --duration $DUR" ;;
        *) return 1 ;;
    esac
}

# Units of work in a client's JSON: connections, round trips, or MB relayed.
units() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
s, c = sys.argv[1], json.load(open(sys.argv[2]))
if s == "connrate":
    print(c["completed"], "connection")
elif s.startswith("lat") or s == "reqrate":
    print(c["completed"], "round trip")
else:
    print(2 * c["tx_bytes"] / 1e6, "MB relayed")
EOF
}

for s in "${SCEN[@]}"; do
    read -r -a args <<<"$(client_args "$s")" || { echo "unknown scenario $s" >&2; continue; }
    echo
    echo "## $s: holdfast-load ${args[*]}"
    for v in hf-auto hf-copy ha-default ha-splice; do
        pid=${PID[$v]}
        # Pass 1: syscall counts and CPU. perf needs a moment to attach on a loaded machine.
        # (Its "time enabled" for a per-task event only runs while the task is on a CPU, so it
        # is no check of coverage; the per-unit counts of accept4/connect/sendto are.)
        perf stat -x, -e "$EVENTS" -p "$pid" -o "$WORK/$s.$v.stat" &
        spid=$!
        BENCH_PIDS+=("$spid")
        sleep 1
        c0=$(cpu_seconds "$pid")
        "$BIN/holdfast-load" --json "${args[@]}" --target "${ADDR[$v]}" >"$WORK/$s.$v.json" 2>/dev/null
        c1=$(cpu_seconds "$pid")
        kill -INT "$spid" 2>/dev/null # perf stat writes its counts on SIGINT
        wait "$spid" 2>/dev/null
        stop_pid "$spid"
        read -r n unit <<<"$(units "$s" "$WORK/$s.$v.json")"
        python3 - "$v" "$n" "$unit" "$c0" "$c1" "$WORK/$s.$v.stat" <<'EOF'
import sys
v, n, unit, c0, c1, path = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
counts = {}
for line in open(path):
    parts = line.strip().split(",")
    if len(parts) > 3 and parts[2].startswith("syscalls:sys_enter_"):
        try:
            k = int(parts[0])
        except ValueError:
            continue
        if k:
            counts[parts[2][len("syscalls:sys_enter_"):]] = k
total = sum(counts.values())
per = lambda k: k / n if n else float("nan")
top = ", ".join("%s %.2f" % (name, per(k)) for name, k in sorted(counts.items(), key=lambda x: -x[1]))
print("%-11s %9.0f x %s  CPU %.1f us/%s  syscalls %.2f/%s: %s" % (
    v, n, unit, (c1 - c0) / n * 1e6 if n else float("nan"), unit, per(total), unit, top))
EOF
        if ((RECORD)); then
            # Pass 2: where the CPU goes (a separate run, so perf record cannot delay pass 1).
            perf record -q -e cpu-clock -g -p "$pid" -o "$WORK/$s.$v.data" >/dev/null 2>&1 &
            rpid=$!
            BENCH_PIDS+=("$rpid")
            sleep 1
            "$BIN/holdfast-load" --json "${args[@]}" --target "${ADDR[$v]}" >/dev/null 2>&1
            kill -INT "$rpid" 2>/dev/null
            wait "$rpid" 2>/dev/null
            stop_pid "$rpid"
            echo "        CPU by binary:" $(perf report -i "$WORK/$s.$v.data" --no-children --sort dso \
                --stdio -g none 2>/dev/null | grep -v '^#' | grep '%' | head -4 | awk '{print $2 " " $1 ","}')
            echo "        top kernel symbols:"
            perf report -i "$WORK/$s.$v.data" --no-children --sort sym --stdio -g none 2>/dev/null |
                grep -v '^#' | grep '%' | grep '\[k\]' | head -6 | sed 's/^ */          /'
            echo "        top user-space symbols:"
            perf report -i "$WORK/$s.$v.data" --no-children --sort sym --stdio -g none 2>/dev/null |
                grep -v '^#' | grep '%' | grep '\[\.\]' | head -6 | sed 's/^ */          /'
        fi
    done
done
