#!/usr/bin/env bash
# holdfast vs HAProxy (mode tcp), side by side, on loopback.
#
#   scripts/bench-vs-haproxy.sh [--quick] [--rounds N] [--out DIR] [--only SCENARIO,...]
#                               [--no-build] [--pin] [--install-haproxy] [--with-sockmap]
#
# Needs HAProxy (apt-get install haproxy; --install-haproxy lets the script run apt-get, it
# never installs anything otherwise). Builds release, starts one echo backend, one holdfast per
# relay mode (--workers 1) and one HAProxy per variant (nbthread 1: default, splice,
# splice-auto), all in front of that same backend, and runs every scenario against each of
# them plus a "direct" row (client -> echo server, no proxy). The bulk scenarios also run
# holdfast auto with --pipe-memory 0 (no grown pipes: the relay before #15) and HAProxy splice
# with tune.pipesize 262144 (pipes as large as holdfast's grown ones). Within a round each
# scenario is run against every variant in turn, the order rotated by one each round; every
# published number is the median over the rounds. Proxy CPU is utime+stime from
# /proc/PID/stat sampled around each client run; RSS is VmRSS from /proc/PID/status.
#
# --pin: every proxy runs on CPU 0 and the load (client and echo server) on CPU 1 (taskset),
# so a proxy-bound rate is the proxy's, not the share of two cores it won from the load.
# Without it everything floats over both cores (the machine's rate with a proxy in the path).
#
# --with-sockmap (root only): adds a `sockmap` variant, examples/sockmap_proxy.rs (the in-kernel
# relay of issue #16, a benchmark instrument, not a holdfast feature) in front of the same echo
# backend, to every scenario, and a section judging it against holdfast copy and splice on
# issue #16's targets. Its own CPU is near zero by construction (the kernel relays in softirq
# and kworker context), so every row also has whole-machine CPU from /proc/stat per unit of
# work, and the hold scenario records the kernel's memory per connection (socket slabs and
# sockstat's TCP pages, as scripts/bench-kernel-memory.sh does) for every variant, direct
# included. sockmap is never counted as holdfast nor as HAProxy.
#
# The report leads with a verdict per row: holdfast (default settings) against the best
# HAProxy variant of that row, ahead / level / behind, judged round by round so that noise
# shows as noise; the detail table follows.
#
# Scenarios (names for --only):
#   lat64, lat1k, lat16k  open-loop latency, 100 connections, 10k req/s, 64 B / 1 KiB / 16 KiB
#   bulk1, bulk4          bulk echo streams (Gbit/s each way, proxy CPU per GB)
#   connrate              connect, 64 B round trip, close; 32 in flight (conn/s)
#   reqrate               closed-loop round trips over 100 kept connections (req/s)
#   hold                  8000 idle connections through a fresh proxy (RSS per connection)
#   cpu64                 (--with-sockmap only) lat64 with the generator sleeping, not spinning,
#                         between sends (--no-spin), so that whole-machine CPU is the work
#
# Every client run also records the whole machine's busy CPU time (/proc/stat: all but idle
# and iowait) around it: on a shared machine that includes other people's work.
#
# Full run: 3 rounds, about 10 minutes. --quick: 1 round, short durations, about 2 minutes.
# Results go to DIR (default target/bench/<date>): the markdown table (also printed),
# per-round values, HAProxy configs, every client's JSON.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
ROUNDS=
OUT=
ONLY=
BUILD=1
PIN=0
INSTALL=0
WITH_SOCKMAP=0
while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --no-build) BUILD=0 ;;
        --pin) PIN=1 ;;
        --install-haproxy) INSTALL=1 ;;
        --with-sockmap) WITH_SOCKMAP=1 ;;
        -h | --help) sed -n '2,50p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if ((QUICK)); then
    ROUNDS=${ROUNDS:-1}
    LAT_D=1s LAT_W=0.3s BULK_D=1s CR_D=1s RR_D=1s
else
    ROUNDS=${ROUNDS:-3}
    LAT_D=3s LAT_W=0.5s BULK_D=3s CR_D=3s RR_D=3s
fi
HOLD_CONNS=8000
LAT_CONNS=100
LAT_RATE=10000
RR_RATE=2000000 # far above what any variant achieves: every connection always has a request queued
CR_CONC=32

OUT=${OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/runs" || exit 1
WORK=$OUT/work
mkdir -p "$WORK"

# shellcheck source=bench/lib.sh
source "$ROOT/scripts/bench/lib.sh"
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

if ((WITH_SOCKMAP)) && (($(id -u) != 0)); then
    echo "error: --with-sockmap needs root (CAP_BPF and CAP_NET_ADMIN)" >&2
    exit 2
fi
if ((PIN)); then
    (($(nproc) >= 2)) || { echo "error: --pin needs 2 CPUs" >&2; exit 2; }
    PIN_PROXY=(taskset -c 0)
    PIN_LOAD=(taskset -c 1)
fi
LOAD_START=$(loadavg)
log "load average at start: $LOAD_START"
ensure_tools "$INSTALL" || exit 1
if ((BUILD)); then build_release || exit 1; fi
if ((WITH_SOCKMAP && BUILD)); then
    log "cargo build --release --example sockmap_proxy"
    (cd "$ROOT" && cargo build --release --quiet --example sockmap_proxy) || exit 1
fi

BENCH_IP=$(pick_bench_ip)
log "benchmark address: $BENCH_IP (loopback); results in $OUT"

ALL_SCENARIOS=(lat64 lat1k lat16k bulk1 bulk4 connrate reqrate hold)
((WITH_SOCKMAP)) && ALL_SCENARIOS+=(cpu64)
if [[ -n $ONLY ]]; then
    IFS=, read -r -a SCENARIOS <<<"$ONLY"
else
    SCENARIOS=("${ALL_SCENARIOS[@]}")
fi
VARIANTS=(direct hf-auto hf-splice hf-copy hf-auto-64k ha-default ha-splice ha-splice-auto ha-splice-256k)
((WITH_SOCKMAP)) && VARIANTS+=(sockmap)
# Variants that only the bulk scenarios run (they change nothing for small messages).
BULK_ONLY=" hf-auto-64k ha-splice-256k "
runs_in() { [[ $1 == bulk* || $BULK_ONLY != *" $2 "* ]]; }

# Client arguments of a scenario (the target is appended by the caller).
client_args() {
    case $1 in
        lat64) echo "latency --conns $LAT_CONNS --rate $LAT_RATE --size 64 --duration $LAT_D --warmup $LAT_W" ;;
        lat1k) echo "latency --conns $LAT_CONNS --rate $LAT_RATE --size 1024 --duration $LAT_D --warmup $LAT_W" ;;
        lat16k) echo "latency --conns $LAT_CONNS --rate $LAT_RATE --size 16384 --duration $LAT_D --warmup $LAT_W" ;;
        cpu64) echo "latency --conns $LAT_CONNS --rate $LAT_RATE --size 64 --duration $LAT_D --warmup $LAT_W --no-spin" ;;
        bulk1) echo "bulk --streams 1 --mode echo --duration $BULK_D" ;;
        bulk4) echo "bulk --streams 4 --mode echo --duration $BULK_D" ;;
        connrate) echo "connect-rate --concurrency $CR_CONC --source-ips 200 --duration $CR_D" ;;
        reqrate) echo "latency --conns $LAT_CONNS --rate $RR_RATE --size 64 --duration $RR_D --warmup 0s --drain 0s" ;;
        hold) echo "hold --conns $HOLD_CONNS" ;;
        *) return 1 ;;
    esac
}
for s in "${SCENARIOS[@]}"; do
    client_args "$s" >/dev/null || { echo "unknown scenario: $s" >&2; exit 2; }
done

# ---- the processes under test --------------------------------------------------------------

declare -A PID ADDR

start_variant() {
    local v=$1 name=${2:-$1}
    case $v in
        direct) PROXY_PID= PROXY_ADDR=$ECHO_ADDR ;;
        hf-auto-64k) start_holdfast "$name" auto "$ECHO_ADDR" --pipe-memory 0 || return 1 ;;
        hf-*) start_holdfast "$name" "${v#hf-}" "$ECHO_ADDR" || return 1 ;;
        ha-*) start_haproxy "$name" "${v#ha-}" "$ECHO_ADDR" || return 1 ;;
        sockmap) start_sockmap "$name" "$ECHO_ADDR" || return 1 ;;
    esac
}

# start_sockmap NAME BACKEND: examples/sockmap_proxy on a free port; sets PROXY_PID and
# PROXY_ADDR. It prints its counters on SIGTERM, into its log.
start_sockmap() {
    local name=$1 backend=$2 logf=$WORK/$1.log
    start_ready "$logf" "sockmap_proxy listening on" 10 \
        "${PIN_PROXY[@]}" "$BIN/examples/sockmap_proxy" --listen "$BENCH_IP:0" --backend "$backend" || return 1
    PROXY_PID=$STARTED_PID
    PROXY_ADDR=$(listen_addr_of "$logf")
}

# Busy CPU seconds of the whole machine so far (/proc/stat: every field but idle and iowait).
machine_busy_s() {
    awk -v tck="$CLK_TCK" '/^cpu / { b = 0; for (i = 2; i <= 9; i++) if (i != 5 && i != 6) b += $i; printf "%.2f\n", b / tck; exit }' /proc/stat
}

# The kernel's memory now, "sock_slab tcp_mem" in bytes: the slab caches a TCP connection
# lives in (active objects x size; kmalloc-* holds the sockhash's psocks) and sockstat's TCP
# buffer pages, as scripts/bench-kernel-memory.sh counts them. sock_slab is "nan" without
# /proc/slabinfo (not root).
kernel_mem() {
    local sock=nan tcp
    if [[ -r /proc/slabinfo ]]; then
        sock=$(awk '$1 ~ /^(TCP|TCPv6|sock_inode_cache|filp|dentry|eventpoll_epi|eventpoll_pwq|skbuff_head_cache|skbuff_small_head|kmalloc-[0-9k]+)$/ { s += $2 * $4 } END { print s + 0 }' /proc/slabinfo)
    fi
    tcp=$(awk -v p="$(getconf PAGESIZE)" '/^TCP:/ { for (i = 1; i < NF; i++) if ($i == "mem") print $(i + 1) * p }' /proc/net/sockstat)
    echo "$sock ${tcp:-nan}"
}

# Makes sure the long-lived instance of variant $1 is up (restarting it if it died).
ensure_variant() {
    local v=$1
    if [[ $v != direct && -n ${PID[$v]:-} ]] && kill -0 "${PID[$v]}" 2>/dev/null; then
        return 0
    fi
    [[ $v == direct && -n ${ADDR[$v]:-} ]] && return 0
    [[ -n ${PID[$v]:-} ]] && log "WARNING: $v (pid ${PID[$v]}) died; restarting it"
    start_variant "$v" || return 1
    PID[$v]=$PROXY_PID
    ADDR[$v]=$PROXY_ADDR
}

start_echo echo || exit 1
log "echo backend on $ECHO_ADDR"
for v in "${VARIANTS[@]}"; do
    used=0
    for s in "${SCENARIOS[@]}"; do runs_in "$s" "$v" && used=1; done
    ((used)) || continue
    ensure_variant "$v" || log "WARNING: cannot start $v; its runs will fail"
done

# ---- what gets published alongside the numbers ---------------------------------------------

machine_info >"$OUT/machine.txt"
haproxy_config default "$BENCH_IP:PORT" "$ECHO_ADDR" >"$OUT/haproxy-default.cfg"
haproxy_config splice "$BENCH_IP:PORT" "$ECHO_ADDR" >"$OUT/haproxy-splice.cfg"
haproxy_config splice-auto "$BENCH_IP:PORT" "$ECHO_ADDR" >"$OUT/haproxy-splice-auto.cfg"
haproxy_config splice-256k "$BENCH_IP:PORT" "$ECHO_ADDR" >"$OUT/haproxy-splice-256k.cfg"
PP=${PIN_PROXY[*]:+${PIN_PROXY[*]} }
PL=${PIN_LOAD[*]:+${PIN_LOAD[*]} }
{
    echo "# backend"
    echo "${PL}holdfast-load echo-server --listen $BENCH_IP:0"
    echo "# proxies (one each, long-lived; the hold scenario starts a fresh one per run)"
    for m in auto splice copy; do
        echo "${PP}holdfast --listen $BENCH_IP:0 --backend $ECHO_ADDR --workers 1 --relay $m"
    done
    echo "${PP}holdfast --listen $BENCH_IP:0 --backend $ECHO_ADDR --workers 1 --relay auto --pipe-memory 0   # bulk only"
    echo "${PP}haproxy -db -f haproxy-{default,splice,splice-auto,splice-256k}.cfg   # splice-256k: bulk only"
    ((WITH_SOCKMAP)) && echo "${PP}sockmap_proxy --listen $BENCH_IP:0 --backend $ECHO_ADDR   # examples/sockmap_proxy.rs, attach stream"
    echo "# clients (--json; TARGET is the echo server for 'direct', else the proxy)"
    for s in "${SCENARIOS[@]}"; do
        echo "$s: ${PL}holdfast-load --json $(client_args "$s") --target TARGET"
    done
    echo "# hold: VmRSS of the proxy before, and after 'holding $HOLD_CONNS' + 0.5 s; then SIGTERM"
    echo "# every run: whole-machine busy CPU from /proc/stat around the client run"
    ((WITH_SOCKMAP)) && echo "# hold (also direct): kernel memory (socket slabs, sockstat TCP mem) before and after"
} >"$OUT/commands.txt"
{
    echo "rounds=$ROUNDS"
    echo "quick=$QUICK"
    echo "loadavg_start=$LOAD_START"
    echo "scenarios=${SCENARIOS[*]}"
    echo "with_sockmap=$WITH_SOCKMAP"
    if ((PIN)); then
        echo "pinning=proxy on CPU 0; client and echo server on CPU 1 (taskset)"
        echo "latency_generator=holdfast-load latency with its default spin (no --no-spin), on CPU 1 with the echo server"
    else
        echo "pinning=none: proxies, echo server and client all float over both CPUs"
        echo "latency_generator=holdfast-load latency with its default spin (no --no-spin), unpinned; proxies, echo server and generator all unpinned"
    fi
} >"$OUT/params.txt"

# ---- running one measurement ---------------------------------------------------------------

# write_meta FILE key=value...: a flat JSON object (values are numbers unless quoted by caller).
write_meta() {
    local file=$1 first=1 kv
    shift
    {
        printf '{'
        for kv in "$@"; do
            ((first)) || printf ','
            first=0
            printf '"%s":%s' "${kv%%=*}" "${kv#*=}"
        done
        printf '}\n'
    } >"$file"
}

num() { [[ $1 =~ ^-?[0-9.]+$ ]] && echo "$1" || echo null; }

# run_client ROUND SCENARIO VARIANT: one client run against one variant.
run_client() {
    local r=$1 s=$2 v=$3 base="$OUT/runs/$1.$2.$3" err= rc=0 c0=0 c1=0 m0 m1 pid target
    local -a args
    read -r -a args <<<"$(client_args "$s")"
    if ! ensure_variant "$v"; then
        write_meta "$base.meta.json" "round=$r" "scenario=\"$s\"" "variant=\"$v\"" \
            "error=\"could not start the proxy\""
        log "round $r $s $v: ERROR could not start the proxy"
        return
    fi
    pid=${PID[$v]:-}
    target=${ADDR[$v]}
    [[ -n $pid ]] && c0=$(cpu_seconds "$pid")
    m0=$(machine_busy_s)
    local budget=$((${LAT_D%s} + ${BULK_D%s} + ${CR_D%s} + 30))
    timeout -s INT -k 5 "$budget" "${PIN_LOAD[@]}" "$BIN/holdfast-load" --json "${args[@]}" --target "$target" \
        >"$base.client.json" 2>"$base.err" || rc=$?
    m1=$(machine_busy_s)
    [[ -n $pid ]] && c1=$(cpu_seconds "$pid")
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
        err="the proxy died during the run"
    elif ((rc == 124 || rc == 130)); then
        err="client timed out after ${budget}s"
    elif ((rc != 0)); then
        err="client exit status $rc: $(head -c 200 "$base.err" | tr -d '"\\' | tr '\n' ' ')"
    fi
    write_meta "$base.meta.json" "round=$r" "scenario=\"$s\"" "variant=\"$v\"" "exit=$rc" \
        "cpu_before_s=$(num "$c0")" "cpu_after_s=$(num "$c1")" \
        "machine_busy_before_s=$(num "$m0")" "machine_busy_after_s=$(num "$m1")" "loadavg=\"$(loadavg)\"" \
        "error=\"$err\""
    if [[ -n $err ]]; then
        log "round $r $s $v: ERROR $err"
    else
        log "round $r $s $v: $(summary "$s" "$base.client.json") cpu $(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.2fs", b-a}')"
    fi
}

# A one-line progress summary of a client's JSON.
#
# reqrate is a closed loop: its schedule (2,000,000 req/s) is far beyond any variant, so every
# connection's queue grows for the whole run and the latency histogram (measured from each
# request's intended send time) is the client's own backlog, about half the run long at the
# median, not a property of the proxy. What is meaningful is the rate, and the mean round
# trip it implies with one request in flight per connection (Little's law: connections /
# rate).
summary() {
    python3 - "$1" "$2" <<'EOF' 2>/dev/null || echo "?"
import json, sys
s, path = sys.argv[1], sys.argv[2]
c = json.load(open(path))
if s == "reqrate":
    rate = c["achieved_rate"]
    rt = c["conns"] / rate * 1e6 if rate else float("nan")
    print("%.0f req/s, mean round trip %.0f us (%d conns / rate) errors %d" % (rate, rt, c["conns"], c["errors"] + c["conn_errors"]))
elif s.startswith("lat") or s == "cpu64":
    l = c["latency_us"]
    print("%.0f req/s p50 %s p99 %s p99.9 %s us errors %d" % (c["achieved_rate"], l["p50"], l["p99"], l["p99_9"], c["errors"] + c["conn_errors"]))
elif s.startswith("bulk"):
    print("%.2f Gbit/s verified=%s" % (c["tx_gbit_per_s"], c["verified"]))
elif s == "connrate":
    print("%.0f conn/s failures %d" % (c["conns_per_sec"], c["failures"]))
EOF
}

# run_hold ROUND VARIANT: RSS per idle connection, through a fresh proxy instance (a
# long-lived one would already hold whatever an earlier hold made it allocate).
run_hold() {
    local r=$1 v=$2 base="$OUT/runs/$1.hold.$2" name="$2-hold-r$1" err= rss0=0 rss1=0 hpid rc=0
    local k0="nan nan" k1="nan nan" ppid='' paddr
    if [[ $v == direct ]]; then
        ((WITH_SOCKMAP)) || return # no proxy, nothing to measure
        paddr=$ECHO_ADDR            # the kernel's memory only: the floor for the others
    elif ! start_variant "$v" "$name"; then
        write_meta "$base.meta.json" "round=$r" "scenario=\"hold\"" "variant=\"$v\"" \
            "error=\"could not start the proxy\""
        log "round $r hold $v: ERROR could not start the proxy"
        return
    else
        ppid=$PROXY_PID paddr=$PROXY_ADDR
    fi
    sleep 0.2
    [[ -n $ppid ]] && rss0=$(rss_kib "$ppid")
    ((WITH_SOCKMAP)) && k0=$(kernel_mem)
    "${PIN_LOAD[@]}" "$BIN/holdfast-load" --json hold --conns "$HOLD_CONNS" --target "$paddr" \
        >"$base.client.json" 2>"$base.err" &
    hpid=$!
    BENCH_PIDS+=("$hpid")
    local deadline=$((SECONDS + 60))
    while ! grep -q '^holding' "$base.err" 2>/dev/null; do
        if ! kill -0 "$hpid" 2>/dev/null || ((SECONDS > deadline)); then
            err="hold client did not report 'holding' (see $base.err)"
            break
        fi
        sleep 0.05
    done
    if [[ -z $err ]]; then
        sleep 0.5
        [[ -n $ppid ]] && rss1=$(rss_kib "$ppid")
        ((WITH_SOCKMAP)) && k1=$(kernel_mem)
        [[ -z $ppid ]] || kill -0 "$ppid" 2>/dev/null || err="the proxy died during the run"
    fi
    stop_pid "$hpid"
    [[ -n $ppid ]] && stop_pid "$ppid"
    local -a ka kb
    read -r -a ka <<<"$k0"
    read -r -a kb <<<"$k1"
    write_meta "$base.meta.json" "round=$r" "scenario=\"hold\"" "variant=\"$v\"" "exit=$rc" \
        "rss_before_kib=$(num "$rss0")" "rss_after_kib=$(num "$rss1")" \
        "sock_slab_before=$(num "${ka[0]}")" "sock_slab_after=$(num "${kb[0]}")" \
        "tcp_mem_before=$(num "${ka[1]}")" "tcp_mem_after=$(num "${kb[1]}")" \
        "loadavg=\"$(loadavg)\"" "error=\"$err\""
    if [[ -n $err ]]; then
        log "round $r hold $v: ERROR $err"
    else
        log "round $r hold $v: RSS $rss0 -> $rss1 KiB, kernel (slab, tcp mem) $k0 -> $k1 ($(grep -o '^holding [0-9]*' "$base.err"))"
    fi
}

# ---- the rounds ----------------------------------------------------------------------------

n=${#VARIANTS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS, load average $(loadavg)"
    for s in "${SCENARIOS[@]}"; do
        for ((i = 0; i < n; i++)); do
            v=${VARIANTS[$(((i + r - 1) % n))]}
            runs_in "$s" "$v" || continue
            if [[ $s == hold ]]; then
                run_hold "$r" "$v"
            else
                run_client "$r" "$s" "$v"
            fi
        done
    done
done

echo "loadavg_end=$(loadavg)" >>"$OUT/params.txt"
bench_cleanup
echo
python3 "$ROOT/scripts/bench/report.py" "$OUT"
echo
echo "(full results, per-round values, configs and raw JSON: $OUT)"
