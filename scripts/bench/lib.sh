# Shared helpers for scripts/bench-vs-haproxy.sh and scripts/splice-threshold.sh.
# Sourced, not run. Expects: ROOT (repository root), WORK (a scratch directory).
#
# Every process started here is recorded in BENCH_PIDS and stopped by bench_cleanup (by pid,
# never by name), which the calling script installs as its EXIT trap.

BIN=${BIN:-$ROOT/target/release}
BENCH_PIDS=()
# Command prefixes that pin the proxies and the load (client, echo server) to CPUs: empty
# (unpinned) unless the calling script sets them, e.g. PIN_PROXY=(taskset -c 0).
PIN_PROXY=()
PIN_LOAD=()
CLK_TCK=$(getconf CLK_TCK)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

bench_cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${BENCH_PIDS[@]}"; do
        # Give each a moment, then insist: a wedged child must not outlive the script.
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    BENCH_PIDS=()
}

# Stops one process started by this script and forgets it.
stop_pid() {
    local pid=$1 p keep=()
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${BENCH_PIDS[@]}"; do
        [[ $p == "$pid" ]] || keep+=("$p")
    done
    BENCH_PIDS=("${keep[@]}")
}

# ensure_tools [INSTALL]: checks for what the benchmarks need. Installs nothing unless
# INSTALL is 1 (the caller's --install-haproxy); otherwise a missing tool is an error that
# says how to install it (Debian/Ubuntu).
ensure_tools() {
    local install=${1:-0} missing=()
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v python3 >/dev/null || missing+=(python3)
    command -v ss >/dev/null || missing+=(iproute2)
    ((${#PIN_PROXY[@]} + ${#PIN_LOAD[@]})) && ! command -v taskset >/dev/null && missing+=(util-linux)
    ((${#missing[@]})) || return 0
    if ((install)); then
        log "installing (asked for with --install-haproxy): ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        local still=()
        command -v haproxy >/dev/null || still+=(haproxy)
        command -v python3 >/dev/null || still+=(python3)
        command -v ss >/dev/null || still+=(iproute2)
        ((${#still[@]} == 0)) && return 0
        missing=("${still[@]}")
    fi
    echo "error: missing: ${missing[*]}. Install with: sudo apt-get install ${missing[*]}" >&2
    echo "       (or rerun with --install-haproxy to have this script run apt-get for you)" >&2
    return 1
}

build_release() {
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet --bin holdfast --bin holdfast-load)
}

# A loopback address of our own (127.A.B.1, random A/B) so that fixed ports (HAProxy needs
# one) cannot collide with anything else on the machine listening on 127.0.0.1.
pick_bench_ip() {
    printf '127.%d.%d.1\n' $((RANDOM % 200 + 30)) $((RANDOM % 250 + 1))
}

# A free TCP port on address $1.
free_port() {
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
print(s.getsockname()[1])
s.close()
EOF
}

# start_when LOG TIMEOUT_S CHECK CMD...: starts CMD in the background (stdout+stderr to LOG)
# and waits until `eval CHECK` succeeds; sets STARTED_PID. Fails (and stops CMD) if it exits
# or does not get ready in time. Not to be called in a subshell: the pid must reach BENCH_PIDS.
start_when() {
    local logf=$1 timeout=$2 check=$3
    shift 3
    "$@" >"$logf" 2>&1 &
    local pid=$!
    BENCH_PIDS+=("$pid")
    STARTED_PID=
    local deadline=$((SECONDS + timeout))
    while ((SECONDS <= deadline)); do
        if eval "$check"; then
            STARTED_PID=$pid
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: exited before ready: $*" >&2
            sed 's/^/    /' "$logf" >&2
            stop_pid "$pid"
            return 1
        fi
        sleep 0.02
    done
    echo "error: not ready after ${timeout}s: $*" >&2
    sed 's/^/    /' "$logf" >&2
    stop_pid "$pid"
    return 1
}

# start_ready LOG PATTERN TIMEOUT_S CMD...: start_when, ready once LOG has a line matching
# PATTERN.
start_ready() {
    local logf=$1 pattern=$2 timeout=$3
    shift 3
    start_when "$logf" "$timeout" 'grep -q -- "$pattern" "$logf" 2>/dev/null' "$@"
}

# The address in the first "listening on ADDR" line of a log.
listen_addr_of() {
    grep -o 'listening on [^ ]*' "$1" | head -1 | cut -d' ' -f3
}

# True once something listens on IP:PORT.
is_listening() {
    [[ -n $(ss -Hltn "src $1:$2" 2>/dev/null) ]]
}

# start_echo NAME: one echo backend on the bench address; sets ECHO_PID and ECHO_ADDR.
start_echo() {
    local logf=$WORK/$1.log
    start_ready "$logf" "listening on" 10 \
        "${PIN_LOAD[@]}" "$BIN/holdfast-load" echo-server --listen "$BENCH_IP:0" || return 1
    ECHO_PID=$STARTED_PID
    ECHO_ADDR=$(listen_addr_of "$logf")
}

# start_holdfast NAME MODE BACKEND [FLAG...]: holdfast --workers 1 on a free port, with any
# further flags; sets PROXY_PID and PROXY_ADDR.
start_holdfast() {
    local name=$1 mode=$2 backend=$3 logf=$WORK/$1.log
    shift 3
    start_ready "$logf" "holdfast listening on" 10 \
        "${PIN_PROXY[@]}" "$BIN/holdfast" --listen "$BENCH_IP:0" --backend "$backend" --workers 1 \
        --relay "$mode" "$@" || return 1
    PROXY_PID=$STARTED_PID
    PROXY_ADDR=$(listen_addr_of "$logf")
}

# HAProxy's configuration for one variant (default | splice | splice-auto | splice-256k:
# splice with tune.pipesize 262144, the size of holdfast's grown pipes). Printed into the
# results: it is part of what is being published.
#
# maxconn 8500 covers the 8000-connection hold test. HAProxy sizes its descriptor needs as
# 2 x maxconn + 2 x maxpipes + a few and refuses to start when that exceeds the open-file
# limit (20000 on the benchmark machine, and it cannot be raised); maxpipes defaults to
# maxconn/4, which would need 21264, so it is set to 1000 -- five times the most pipes any
# scenario here can use at once (100 connections x 2 directions). It is set in all three
# variants so they differ only in the splice options.
haproxy_config() {
    local variant=$1 bind=$2 backend=$3 opts= tune=
    case $variant in
        default) ;;
        splice) opts=$'    option splice-request\n    option splice-response\n' ;;
        splice-256k)
            opts=$'    option splice-request\n    option splice-response\n'
            tune=$'    tune.pipesize 262144\n'
            ;;
        splice-auto) opts=$'    option splice-auto\n' ;;
        *) echo "unknown haproxy variant $variant" >&2; return 1 ;;
    esac
    cat <<EOF
global
    nbthread 1
    maxconn 8500
    maxpipes 1000
${tune}
    # no "log" line: nothing is logged

defaults
    mode tcp
    maxconn 8500
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
${opts}
frontend fe
    bind $bind
    default_backend be

backend be
    server s1 $backend
EOF
}

# start_haproxy NAME VARIANT BACKEND: HAProxy on a free port; sets PROXY_PID and PROXY_ADDR.
start_haproxy() {
    local name=$1 variant=$2 backend=$3 port cfg
    port=$(free_port "$BENCH_IP") || return 1
    cfg=$WORK/$name.cfg
    haproxy_config "$variant" "$BENCH_IP:$port" "$backend" >"$cfg" || return 1
    if ! haproxy -c -q -f "$cfg" >"$WORK/$name.check" 2>&1; then
        echo "error: haproxy rejects $cfg:" >&2
        sed 's/^/    /' "$WORK/$name.check" >&2
        return 1
    fi
    # HAProxy prints no readiness line: wait for its listening socket.
    start_when "$WORK/$name.log" 10 'is_listening "$BENCH_IP" "$port"' \
        "${PIN_PROXY[@]}" haproxy -db -f "$cfg" || return 1
    PROXY_PID=$STARTED_PID
    PROXY_ADDR=$BENCH_IP:$port
}

# Process CPU time (user + system, all threads) in seconds, from /proc/PID/stat.
cpu_seconds() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo "nan"; return; }
    # Fields after the ")" closing the command name: utime is the 12th, stime the 13th.
    awk -v tck="$CLK_TCK" '{ print ($12 + $13) / tck }' <<<"${stat##*) }"
}

# VmRSS of a process in KiB.
rss_kib() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo "nan"
}

# Load average (1, 5, 15 min).
loadavg() {
    cut -d' ' -f1-3 /proc/loadavg
}

# machine_info: one line per fact, for the report header.
machine_info() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel: $(uname -r)"
    echo "open-file limit: $(ulimit -n)"
    echo "haproxy: $(haproxy -v 2>/dev/null | head -1)"
    echo "holdfast: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
    echo "rustc: $(rustc --version 2>/dev/null)"
}
