#!/usr/bin/env bash
# Live upgrade under load: holdfast's SIGUSR2 upgrade next to HAProxy's master-worker reload,
# with the same N long-lived sessions through each.
#
#   scripts/bench-upgrade.sh [--conns N] [--interval DUR] [--no-build] [--no-haproxy]
#
# Three processes on loopback: the echo backend (holdfast-load echo-server), the proxy, and
# the load (examples/upgrade_load.rs: N sessions, each a 32-byte message every DUR (default
# 100ms, i.e. 10 N messages a second: lengthen it if the machine cannot keep up), every
# echo checked byte for byte and in order). They are separate processes so that each stays
# under the open-file limit: the proxy holds 2 descriptors a session, the load and the echo
# server 1 each.
#
# holdfast: started with --upgrade-socket and --pid-file; once every session is established
# and has run SETTLE (env, default 10) s, the window opens, SIGUSR2 is sent, and the window closes 2 s after the old
# process has exited. HAProxy (mode tcp, master-worker, hard-stop-after 5s): the window opens,
# the master gets SIGUSR2 (a reload: new worker, old worker finishes its sessions or is
# stopped at hard-stop-after), and the window closes 2 s after the old worker has exited.
#
# Printed per proxy: sessions kept (never closed, every echo back), sessions cut, bytes
# verified, the round trip before the window, and the pause: per session the largest
# send-to-echo time of a message sent or echoed in the window, p50/p99/max over sessions.
# Default N = 5000; needs an open-file limit of at least N*2+100 for the proxy.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONNS=5000
INTERVAL=100ms
SETTLE=${SETTLE:-10}
BUILD=1
HAPROXY=1
while (($#)); do
    case $1 in
        --conns) CONNS=$2; shift ;;
        --interval) INTERVAL=$2; shift ;;
        --no-build) BUILD=0 ;;
        --no-haproxy) HAPROXY=0 ;;
        -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

BIN=$ROOT/target/release
WORK=$(mktemp -d /tmp/bench-upgrade.XXXXXX)
PIDS=()
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
cleanup() {
    local pid
    exec 3>&- 2>/dev/null
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

need=$((CONNS * 2 + 100))
if (($(ulimit -n) < need)); then
    ulimit -n "$need" 2>/dev/null || { echo "open-file limit $(ulimit -n) < $need" >&2; exit 1; }
fi

if ((BUILD)); then
    log "building (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin holdfast --bin holdfast-load \
        --example upgrade_load) || exit 1
fi
LOAD=$BIN/examples/upgrade_load

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits (up to $3 s) until file $1 contains $2.
wait_for() {
    local i
    for ((i = 0; i < $3 * 20; i++)); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "timed out waiting for '$2' in $1:" >&2
    tail -5 "$1" >&2
    return 1
}

# Waits until process $1 has exited (up to $2 s).
wait_gone() {
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.05
    done
    return 1
}

"$BIN/holdfast-load" echo-server --listen 127.0.0.1:0 2>"$WORK/echo.log" >&2 &
PIDS+=($!)
wait_for "$WORK/echo.log" "listening on" 10 || exit 1
ECHO=$(grep -o 'listening on [0-9.:]*' "$WORK/echo.log" | head -1 | awk '{print $3}')
log "echo backend on $ECHO"

# Starts the load against $1 with its control on fd 3 and output in $WORK/$2.*, and waits
# until every session is established.
start_load() {
    rm -f "$WORK/ctl"
    mkfifo "$WORK/ctl"
    "$LOAD" --target "$1" --conns "$CONNS" --interval "$INTERVAL" --threads 2 <"$WORK/ctl" >"$WORK/$2.out" 2>"$WORK/$2.err" &
    LOAD_PID=$!
    PIDS+=("$LOAD_PID")
    exec 3>"$WORK/ctl"
    wait_for "$WORK/$2.err" "holding" 120 || exit 1
    log "$2: $CONNS sessions established; ${SETTLE}s of traffic before the window"
    sleep "$SETTLE"
}

finish_load() {
    echo end >&3
    exec 3>&-
    wait "$LOAD_PID"
    echo "== $1 =="
    cat "$WORK/$1.out"
}

# ---- holdfast: SIGUSR2 ----
PORT=$(free_port)
"$BIN/holdfast" --listen 127.0.0.1:"$PORT" --backend "$ECHO" --workers 2 \
    --upgrade-socket "$WORK/upgrade.sock" --pid-file "$WORK/holdfast.pid" 2>"$WORK/holdfast.log" &
PIDS+=($!)
wait_for "$WORK/holdfast.pid" "[0-9]" 10 || exit 1
OLD=$(cat "$WORK/holdfast.pid")
start_load 127.0.0.1:"$PORT" holdfast
echo mark >&3
log "holdfast: SIGUSR2 to $OLD"
kill -USR2 "$OLD"
wait_gone "$OLD" 60 || { log "the old holdfast did not exit"; tail "$WORK/holdfast.log" >&2; exit 1; }
NEW=$(cat "$WORK/holdfast.pid")
PIDS+=("$NEW")
sleep 2
finish_load holdfast
grep -o 'handed .*pause [^)]*)' "$WORK/holdfast.log" | sed 's/^/holdfast log: /'
echo
kill -TERM "$NEW" 2>/dev/null
wait_gone "$NEW" 40

((HAPROXY)) || exit 0
# ---- HAProxy: master-worker reload ----
command -v haproxy >/dev/null || { echo "haproxy not installed" >&2; exit 1; }
PORT=$(free_port)
cat >"$WORK/haproxy.cfg" <<EOF
global
    master-worker
    maxconn $((CONNS + 1000))
    hard-stop-after 5s
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:$PORT
    default_backend be
backend be
    server echo $ECHO
EOF
haproxy -W -db -f "$WORK/haproxy.cfg" -p "$WORK/haproxy.pid" >"$WORK/haproxy.log" 2>&1 &
MASTER=$!
PIDS+=("$MASTER")
for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT),1)" 2>/dev/null && break
    sleep 0.1
done
worker_pids() { ps -o pid= --ppid "$MASTER" | tr -d ' '; }
OLD_WORKERS=$(worker_pids)
start_load 127.0.0.1:"$PORT" haproxy
echo mark >&3
log "haproxy: SIGUSR2 to the master $MASTER (old workers: $OLD_WORKERS)"
kill -USR2 "$MASTER"
for w in $OLD_WORKERS; do wait_gone "$w" 60; done
sleep 2
finish_load haproxy
echo "haproxy $(haproxy -v | head -1 | awk '{print $3}'): hard-stop-after 5s"
