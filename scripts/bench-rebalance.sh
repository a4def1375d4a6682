#!/usr/bin/env bash
# Scaling out with long-lived connections: how long until a third backend holds its share,
# and how fast clients reconnect meanwhile, with and without --rebalance-on-join.
#
#   scripts/bench-rebalance.sh [--conns N] [--window DUR] [--rate N] [--watch SECS] [--no-build]
#
# Two echo backends (holdfast-load echo-server) behind holdfast (least-conn, --admin), N
# clients (default 2000) that reconnect at once whenever a connection ends (a Python loop, one
# thread), all on loopback. Once every client is connected, a third backend is added to the
# backends file and holdfast gets SIGHUP. The script then watches /backends every 100 ms for
# --watch seconds (default: the window plus 10) and prints, for each variant:
#   converge_s    time from the SIGHUP until every backend holds its share +-10%
#                 ("never" if not within the watch)
#   closed        sessions the rebalance closed (holdfast_rebalance_closed_total, summed)
#   peak_per_s    the most reconnects the clients made in any one second
#   share_end     the backends' session counts at the end
# Variants: "off" (no rebalancing: only clients that happen to reconnect would move, and
# these never do) and "on" (--rebalance-on-join WINDOW, --rebalance-max-rate RATE).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONNS=2000
WINDOW=10s
RATE=100
WATCH=
BUILD=1
while (($#)); do
    case $1 in
        --conns) CONNS=$2; shift ;;
        --window) WINDOW=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --watch) WATCH=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
window_s=$(python3 -c "
import re,sys
m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)', '$WINDOW')
if not m: sys.exit('bad --window: $WINDOW (use e.g. 10s, 500ms, 2m)')
v,u=float(m[1]),m[2]
print(v/1000 if u=='ms' else v*60 if u=='m' else v)") || exit 2
WATCH=${WATCH:-$(python3 -c "print(int($window_s) + 10)")}

if ((BUILD)); then
    (cd "$ROOT" && cargo build --release --quiet) || exit 1
fi
BIN=$ROOT/target/release
ulimit -n $((CONNS * 4 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run_variant() {
    local name=$1; shift
    local b1 b2 b3 lp ap
    b1=$(free_port) b2=$(free_port) b3=$(free_port) lp=$(free_port) ap=$(free_port)
    for p in $b1 $b2 $b3; do
        "$BIN/holdfast-load" echo-server --listen "127.0.0.1:$p" >/dev/null 2>&1 &
        PIDS+=($!)
    done
    printf '127.0.0.1:%s\n127.0.0.1:%s\n' "$b1" "$b2" >"$WORK/backends"
    "$BIN/holdfast" --listen "127.0.0.1:$lp" --backends-file "$WORK/backends" \
        --admin "127.0.0.1:$ap" --health-check none --log-level warn "$@" \
        2>"$WORK/holdfast-$name.log" &
    local hf=$!
    PIDS+=($hf)
    python3 - "$name" "$lp" "$ap" "$CONNS" "$WATCH" "$hf" "$WORK/backends" "$b3" <<'PY'
import json, os, selectors, signal, socket, sys, time, urllib.request

name, lp, ap, n, watch, pid, backends_file, b3 = sys.argv[1:]
lp, n, watch, pid = int(lp), int(n), float(watch), int(pid)
target = ("127.0.0.1", lp)

def admin(path):
    with urllib.request.urlopen(f"http://127.0.0.1:{ap}{path}", timeout=5) as r:
        return r.read().decode()

deadline = time.time() + 10
while True:
    try:
        admin("/backends"); socket.create_connection(target, timeout=1).close(); break
    except OSError:
        if time.time() > deadline: sys.exit(f"{name}: holdfast did not start")
        time.sleep(0.05)

sel = selectors.DefaultSelector()
reconnects = []
def open_one(i):
    s = socket.create_connection(target, timeout=10)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)

for i in range(n):
    open_one(i)
def counts():
    return [b["sessions_active"] for b in json.loads(admin("/backends"))]
deadline = time.time() + 30
while sum(counts()) < n and time.time() < deadline:
    time.sleep(0.05)

with open(backends_file, "a") as f:
    f.write(f"127.0.0.1:{b3}\n")
t0 = time.time()
os.kill(pid, signal.SIGHUP)
converged = None
next_look = t0
while time.time() - t0 < watch:
    for key, _ in sel.select(timeout=0.02):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(s); s.close()
            reconnects.append(time.time())
            open_one(key.data)
    if time.time() >= next_look:
        next_look += 0.1
        c = counts()
        total = sum(c)
        if converged is None and len(c) == 3 and total >= n * 0.99 and all(
                abs(x - total / 3) <= 0.1 * total / 3 for x in c):
            converged = time.time() - t0
per_second = {}
for t in reconnects:
    per_second[int(t - t0)] = per_second.get(int(t - t0), 0) + 1
metrics = admin("/metrics")
closed = sum(int(float(l.split()[-1])) for l in metrics.splitlines()
             if l.startswith("holdfast_rebalance_closed_total{"))
print(f"{name:8} converge_s={'never' if converged is None else f'{converged:.1f}'} "
      f"closed={closed} peak_per_s={max(per_second.values(), default=0)} "
      f"share_end={counts()}")
PY
    kill "$hf" 2>/dev/null
}

echo "conns=$CONNS window=$WINDOW rate=$RATE watch=${WATCH}s"
run_variant off
run_variant on --rebalance-on-join "$WINDOW" --rebalance-max-rate "$RATE"
