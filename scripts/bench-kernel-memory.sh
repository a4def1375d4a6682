#!/usr/bin/env bash
# Kernel memory per idle proxied connection: holdfast against HAProxy, and no proxy at all.
#
#   scripts/bench-kernel-memory.sh [--conns N] [--rounds R] [--no-build]
#
# For each variant (direct: client -> echo server; holdfast --workers 1; HAProxy nbthread 1,
# mode tcp), in rounds with the order rotated: a fresh proxy, a snapshot of the kernel's
# memory, N connections opened through it and proven with a 1-byte round trip each
# (holdfast-load hold), one second to settle, a second snapshot, then everything stopped.
# Per connection, from the difference of the snapshots:
#
#   sock_slab   the slab caches a TCP connection lives in, active objects x object size
#               (/proc/slabinfo, root only): TCP, TCPv6, sock_inode_cache, filp, dentry,
#               eventpoll_epi, eventpoll_pwq, skbuff_head_cache, skbuff_small_head, kmalloc-*
#   slab_total  Slab: in /proc/meminfo (every slab cache: also whatever else the machine did)
#   tcp_mem     sockstat's TCP "mem" (pages of socket buffers) x page size
#   proxy_rss   the proxy's VmRSS
#
# A proxied connection is four sockets on this machine (client, the proxy's two, the
# backend's); a direct one is two. The "proxy's share" rows subtract the direct row: what a
# proxy adds in the kernel per connection. Medians over the rounds. Other processes on the
# machine move slab_total; sock_slab is the figure to read.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONNS=4000
ROUNDS=3
BUILD=1
while (($#)); do
    case $1 in
        --conns) CONNS=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h | --help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -r /proc/slabinfo ]] || { echo "error: /proc/slabinfo is not readable (run as root)" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "error: haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }

OUT=$ROOT/target/bench/kernel-memory-$(date +%Y%m%d-%H%M%S)
WORK=$OUT/work
mkdir -p "$WORK" || exit 1
# shellcheck source=bench/lib.sh
source "$ROOT/scripts/bench/lib.sh"
trap bench_cleanup EXIT
trap 'exit 130' INT TERM
if ((BUILD)); then build_release || exit 1; fi
BENCH_IP=$(pick_bench_ip)
PAGE=$(getconf PAGESIZE)

# One snapshot: "sock_slab slab_total tcp_mem" in bytes.
snapshot() {
    local sock slab tcp
    sock=$(awk '$1 ~ /^(TCP|TCPv6|sock_inode_cache|filp|dentry|eventpoll_epi|eventpoll_pwq|skbuff_head_cache|skbuff_small_head|kmalloc-[0-9k]+)$/ { s += $2 * $4 } END { print s + 0 }' /proc/slabinfo)
    slab=$(awk '/^Slab:/ { print $2 * 1024 }' /proc/meminfo)
    tcp=$(awk -v p="$PAGE" '/^TCP:/ { for (i = 1; i < NF; i++) if ($i == "mem") print $(i + 1) * p }' /proc/net/sockstat)
    echo "$sock $slab ${tcp:-0}"
}

start_echo echo || exit 1
log "echo backend on $ECHO_ADDR; $CONNS connections per run, $ROUNDS rounds; results in $OUT"
VARIANTS=(direct holdfast haproxy)
RESULTS=$OUT/runs.tsv
printf 'round\tvariant\tsock_slab\tslab_total\ttcp_mem\tproxy_rss\tload\n' >"$RESULTS"

run() {
    local r=$1 v=$2 pid= target rss0=0 rss1=0 s0 s1 hpid
    case $v in
        direct) target=$ECHO_ADDR ;;
        holdfast) start_holdfast "hf-$r" auto "$ECHO_ADDR" || return 1; pid=$PROXY_PID; target=$PROXY_ADDR ;;
        haproxy) start_haproxy "ha-$r" default "$ECHO_ADDR" || return 1; pid=$PROXY_PID; target=$PROXY_ADDR ;;
    esac
    sleep 0.5
    [[ -n $pid ]] && rss0=$(rss_kib "$pid")
    s0=$(snapshot)
    "$BIN/holdfast-load" hold --conns "$CONNS" --target "$target" >"$WORK/hold-$r-$v.out" 2>&1 &
    hpid=$!
    BENCH_PIDS+=("$hpid")
    local deadline=$((SECONDS + 60))
    until grep -q '^holding' "$WORK/hold-$r-$v.out" 2>/dev/null; do
        if ! kill -0 "$hpid" 2>/dev/null || ((SECONDS > deadline)); then
            log "round $r $v: the hold client did not report 'holding' (see $WORK/hold-$r-$v.out)"
            stop_pid "$hpid"; [[ -n $pid ]] && stop_pid "$pid"
            return 1
        fi
        sleep 0.05
    done
    sleep 1
    s1=$(snapshot)
    [[ -n $pid ]] && rss1=$(rss_kib "$pid")
    stop_pid "$hpid"
    [[ -n $pid ]] && stop_pid "$pid"
    read -r a0 b0 c0 <<<"$s0"
    read -r a1 b1 c1 <<<"$s1"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$v" $((a1 - a0)) $((b1 - b0)) $((c1 - c0)) \
        $(((rss1 - rss0) * 1024)) "$(loadavg | cut -d' ' -f1)" >>"$RESULTS"
    log "round $r $v: sock_slab +$(((a1 - a0) / CONNS)) B/conn, slab_total +$(((b1 - b0) / CONNS)) B/conn, tcp_mem +$(((c1 - c0) / CONNS)) B/conn"
    # Let the closed sockets' memory go back before the next run measures.
    sleep 2
}

n=${#VARIANTS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
        run "$r" "${VARIANTS[$(((i + r - 1) % n))]}" || log "round $r: a run failed"
    done
done

machine_info >"$OUT/machine.txt"
python3 - "$RESULTS" "$CONNS" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
conns = int(sys.argv[2])
cols = ["sock_slab", "slab_total", "tcp_mem", "proxy_rss"]
med = {}
for v in ["direct", "holdfast", "haproxy"]:
    rs = [r for r in rows if r["variant"] == v]
    if not rs:
        continue
    med[v] = {c: statistics.median(int(r[c]) / conns for r in rs) for c in cols}
    med[v]["n"] = len(rs)
print("bytes per idle connection (median over rounds):")
print("| variant | rounds | sock_slab | slab_total | tcp_mem | proxy RSS |")
print("|---|---|---|---|---|---|")
for v, m in med.items():
    print(f"| {v} | {m['n']} | {m['sock_slab']:.0f} | {m['slab_total']:.0f} | {m['tcp_mem']:.0f} | {m['proxy_rss']:.0f} |")
if "direct" in med:
    print()
    print("the proxy's share (minus direct):")
    print("| proxy | sock_slab | slab_total | kernel + user (sock_slab + tcp_mem + RSS) |")
    print("|---|---|---|---|")
    share = {}
    for v in ["holdfast", "haproxy"]:
        if v in med:
            d = {c: med[v][c] - med["direct"][c] for c in ["sock_slab", "slab_total", "tcp_mem"]}
            total = d["sock_slab"] + d["tcp_mem"] + med[v]["proxy_rss"]
            share[v] = total
            print(f"| {v} | {d['sock_slab']:.0f} | {d['slab_total']:.0f} | {total:.0f} |")
    if len(share) == 2 and share["haproxy"] > 0:
        print()
        print(f"holdfast / haproxy, kernel + user per connection: {share['holdfast'] / share['haproxy']:.2f}")
EOF
echo "(per-run values: $RESULTS)"
