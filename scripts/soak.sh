#!/usr/bin/env bash
# Soak test: mixed load through one holdfast for N minutes, sampling its resources, and a
# verdict per series (flat or GROWING) from a robust slope over the second half.
#
#   scripts/soak.sh [--minutes N] [--interval SECONDS] [--warmup SECONDS] [--out DIR]
#
# Defaults: 30 minutes, a sample every 5 s, warm-up the first half, output in
# target/soak/<date>-<time>/.
#
# What runs (release build, all on loopback):
#   - two echo backends (holdfast-load echo-server) and holdfast in front of them, with --admin;
#   - for the whole run: HOLD_CONNS idle sessions (holdfast-load hold) and LATENCY_CONNS
#     long-lived sessions with periodic traffic (holdfast-load latency, LATENCY_RATE requests/s
#     over all of them);
#   - every interval, at once: a connect storm of STORM_CONNS short connections (connect, 1-byte
#     round trip, close) and BULK_STREAMS bulk echo streams for BULK_SECONDS; then, once the
#     storm and the streams are over and holdfast is quiet again (only the long-lived sessions,
#     no pipe or buffer in use; at most 5 s), one sample.
# HOLDFAST_ARGS adds flags to holdfast's command line (HOLDFAST_ARGS="--relay splice").
#
# A sample (a line of DIR/samples.csv): seconds since start, holdfast's VmRSS (KiB), its open
# descriptors (all, and pipe ends), pipes and buffers in use and active sessions (/metrics),
# and the kernel's TCP memory (pages) and sockets in use (/proc/net/sockstat).
#
# Verdict, over the samples after the warm-up (by default the second half of the run): the
# growth of each series from the median of the first third of those samples to the median of
# the last third, projected over one hour, against a threshold. Medians, not a least-squares
# line: a sample that happened to catch one session or one pipe in flight moves a median not at
# all, where it tilts a fitted line; and a slow leak that steps up (one descriptor every ten
# minutes) still moves the last third's median above the first's.
#   rss_kb          5 MiB/h
#   fds_beyond_load 1/h    (descriptors that are not pipe ends, minus two per active session:
#                           what the load's own sessions do not explain)
#   pipes_in_use, buffers_in_use, active    1/h each
#   pipe_ends       bounded, not sloped: the workers keep up to 16 empty pipes each for reuse,
#                   so the pool fills in steps as bursts need more; flat while its most stays
#                   within 2 x (16 x workers + pipes in use)
#   tcp_mem_pages   reported, no verdict (the whole network namespace's, not only holdfast's)
# Exit status: 0 if every series is flat and every load run succeeded; 1 otherwise; 2 for a
# usage error. Short runs are indicative only: holdfast's RSS rises by about 0.5 MB over its
# first ~3 minutes under this load, then stays flat, and that rise, projected over an hour,
# fails a 3-minute run. See docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
minutes=30
interval=5
warmup=""
out=""
while (($#)); do
    case $1 in
        --minutes) minutes=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        --interval) interval=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        --warmup) warmup=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        --out) out=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ $minutes =~ ^[1-9][0-9]*$ ]] || { echo "error: --minutes wants a whole number >= 1, not '$minutes'" >&2; exit 2; }
[[ $interval =~ ^[1-9][0-9]*$ ]] || { echo "error: --interval wants whole seconds >= 1, not '$interval'" >&2; exit 2; }
if [[ -n $warmup ]] && ! { [[ $warmup =~ ^[0-9]+$ ]] && ((warmup < minutes * 60)); }; then
    echo "error: --warmup wants whole seconds shorter than the run, not '$warmup'" >&2
    exit 2
fi

WORKERS=2
HOLD_CONNS=${HOLD_CONNS:-500}
LATENCY_CONNS=${LATENCY_CONNS:-200}
LATENCY_RATE=${LATENCY_RATE:-200}
STORM_CONNS=${STORM_CONNS:-200}
BULK_STREAMS=${BULK_STREAMS:-2}
BULK_SECONDS=${BULK_SECONDS:-1}
steady=$((HOLD_CONNS + LATENCY_CONNS))

out=${out:-target/soak/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
csv=$out/samples.csv

echo "building (release)..."
cargo build --release --quiet --bins
bin=target/release

# Everything started here is a job of this shell; on exit, the ones still running are stopped
# and waited for. (Pids come from `jobs`, not from a list built in `$(...)` subshells, which
# would lose them, nor from pids of jobs already reaped, which may have been reused.)
cleanup() {
    local running
    running=$(jobs -pr)
    if [[ -n $running ]]; then
        # shellcheck disable=SC2086
        kill $running 2>/dev/null || true
    fi
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# `wait_for VAR LOG PATTERN PID` waits (up to 10 s, while PID lives) for a line of LOG with
# PATTERN and sets VAR to the word that follows PATTERN; exits the script if none comes.
wait_for() {
    local var=$1 log=$2 pattern=$3 pid=$4
    for _ in $(seq 200); do
        if grep -q "$pattern" "$log"; then
            printf -v "$var" '%s' "$(grep -o "$pattern[^ ]*" "$log" | head -1 | sed "s|^$pattern||")"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.05
    done
    echo "error: no '$pattern' in $log:" >&2
    cat "$log" >&2
    exit 1
}

# `start VAR LOG PATTERN CMD...` starts CMD in the background with its output in LOG and
# waits for PATTERN (see wait_for); `last_pid` is CMD's pid. It runs in this shell, not in a
# `$(...)`, so the job is this shell's and the cleanup stops it.
start() {
    local var=$1 log=$2 pattern=$3
    shift 3
    "$@" >"$log" 2>&1 &
    last_pid=$!
    wait_for "$var" "$log" "$pattern" "$last_pid"
}

start backend_a "$out/echo-a.log" "listening on " $bin/holdfast-load echo-server --listen 127.0.0.1:0
start backend_b "$out/echo-b.log" "listening on " $bin/holdfast-load echo-server --listen 127.0.0.1:0
start lb "$out/holdfast.log" "listening on " $bin/holdfast --listen 127.0.0.1:0 \
    --backend "$backend_a" --backend "$backend_b" --workers "$WORKERS" --admin 127.0.0.1:0 \
    --drain-timeout 5s --close-spread 1s ${HOLDFAST_ARGS:-}
hf_pid=$last_pid
wait_for admin "$out/holdfast.log" "admin endpoint on http://" "$hf_pid"
echo "holdfast pid $hf_pid on $lb (admin $admin), backends $backend_a $backend_b; output in $out"

start held "$out/hold.log" "holding " $bin/holdfast-load hold --target "$lb" --conns "$HOLD_CONNS"
hold_pid=$last_pid
$bin/holdfast-load latency --target "$lb" --conns "$LATENCY_CONNS" --rate "$LATENCY_RATE" \
    --no-spin --duration "$((minutes * 60 + 600))s" >"$out/latency.log" 2>&1 &
latency_pid=$!

# One CSV line: t, rss_kb, fds, pipe_fds, pipes_in_use, buffers_in_use, active, tcp_mem_pages,
# tcp_inuse. Waits (at most 5 s) until holdfast is quiet: only the long-lived sessions, no pipe
# or buffer in use; samples anyway after that (the figures then show what was still going on).
sample() {
    local metrics active pipes buffers deadline=$((SECONDS + 5))
    while :; do
        metrics=$(curl -s --max-time 5 "http://$admin/metrics" || true)
        active=$(awk '$1 == "holdfast_sessions_active" {print $2}' <<<"$metrics")
        pipes=$(awk '$1 == "holdfast_pipes_in_use" {print $2}' <<<"$metrics")
        buffers=$(awk '$1 == "holdfast_buffers_in_use" {print $2}' <<<"$metrics")
        if [[ $active == "$steady" && $pipes == 0 && $buffers == 0 ]] || ((SECONDS >= deadline)); then
            break
        fi
        sleep 0.1
    done
    local rss fds pipe_fds tcp
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$hf_pid/status")
    fds=$(find "/proc/$hf_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
    pipe_fds=$(find "/proc/$hf_pid/fd" -mindepth 1 -maxdepth 1 -lname 'pipe:*' | wc -l)
    tcp=$(awk '$1 == "TCP:" {for (i = 2; i < NF; i += 2) v[$i] = $(i + 1); print v["mem"] "," v["inuse"]}' /proc/net/sockstat)
    echo "$((SECONDS - started)),$rss,$fds,$pipe_fds,${pipes:-},${buffers:-},${active:-},$tcp"
}

echo "t,rss_kb,fds,pipe_fds,pipes_in_use,buffers_in_use,active,tcp_mem_pages,tcp_inuse" >"$csv"
started=$SECONDS
end=$((started + minutes * 60))
runs=0
failed_runs=0
samples=0
echo "columns: $(head -1 "$csv")"
echo "running for $minutes min: $HOLD_CONNS held + $LATENCY_CONNS latency sessions ($LATENCY_RATE req/s)," \
    "every ${interval}s a storm of $STORM_CONNS and $BULK_STREAMS bulk streams for ${BULK_SECONDS}s"
while ((SECONDS < end)); do
    next=$((SECONDS + interval))
    $bin/holdfast-load storm --target "$lb" --conns "$STORM_CONNS" >>"$out/storm.log" 2>&1 &
    storm_pid=$!
    $bin/holdfast-load bulk --target "$lb" --streams "$BULK_STREAMS" --duration "${BULK_SECONDS}s" \
        >>"$out/bulk.log" 2>&1 &
    bulk_pid=$!
    for pid in $storm_pid $bulk_pid; do
        runs=$((runs + 1))
        wait "$pid" || failed_runs=$((failed_runs + 1))
    done
    if ! kill -0 "$hf_pid" 2>/dev/null; then
        echo "error: holdfast (pid $hf_pid) is gone; its log:" >&2
        tail -20 "$out/holdfast.log" >&2
        exit 1
    fi
    line=$(sample)
    echo "$line" >>"$csv"
    samples=$((samples + 1))
    if [[ -t 1 ]]; then
        printf '\r%s' "$line   "
    elif ((samples % 12 == 1)); then
        echo "$line"
    fi
    while ((SECONDS < next)); do sleep 0.2; done
done
if [[ -t 1 ]]; then echo; fi

# The long-lived load ends with its own report (one SIGTERM: a clean stop).
kill -TERM "$hold_pid" "$latency_pid" 2>/dev/null || true
for pid in $hold_pid $latency_pid; do
    runs=$((runs + 1))
    wait "$pid" || failed_runs=$((failed_runs + 1))
done

echo "samples: $csv"
python3 - "$csv" "$steady" "$failed_runs" "$runs" "$warmup" "$WORKERS" <<'EOF'
import csv, sys

path, steady, failed_runs, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
warmup = float(sys.argv[5]) if sys.argv[5] else None
workers = int(sys.argv[6])
POOLED_PIPES = 16  # relay::MAX_POOLED_PIPES, per worker
rows, skipped = [], 0
for r in csv.DictReader(open(path)):
    try:
        rows.append({k: float(v) for k, v in r.items()})
    except ValueError:  # a sample without /metrics (the admin endpoint did not answer)
        skipped += 1
if skipped:
    print(f"{skipped} incomplete sample(s) left out")
if len(rows) < 4:
    print(f"only {len(rows)} samples: run longer for a verdict")
    sys.exit(1)
for r in rows:
    r["fds_beyond_load"] = r["fds"] - r["pipe_fds"] - 2 * r["active"]
half = rows[-1]["t"] / 2 if warmup is None else warmup
tail = [r for r in rows if r["t"] >= half]
if len(tail) < 3:
    print(f"only {len(tail)} samples after the warm-up: run longer for a verdict")
    sys.exit(1)

def median(v):
    v = sorted(v)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2

def slope(xs, ys):
    """From the median of the first third of the samples to the median of the last third."""
    k = max(1, len(xs) // 3)
    dx = median(xs[-k:]) - median(xs[:k])
    return 0.0 if dx == 0 else (median(ys[-k:]) - median(ys[:k])) / dx

# series, unit, threshold of growth per hour (None: reported only)
series = [
    ("rss_kb", "KiB", 5 * 1024),
    ("fds_beyond_load", "fds", 1),
    ("pipes_in_use", "pipes", 1),
    ("buffers_in_use", "buffers", 1),
    ("active", "sessions", 1),
    ("pipe_ends", "fds", "bounded"),
    ("tcp_mem_pages", "pages", None),
]
for r in rows:
    r["pipe_ends"] = r["pipe_fds"]
pipe_bound = 2 * (POOLED_PIPES * workers + max(r["pipes_in_use"] for r in tail))
print(f"{len(rows)} samples over {rows[-1]['t']:.0f} s; verdict over the {len(tail)} from "
      f"t >= {half:.0f} s (steady load: {steady} sessions)")
print(f"{'series':<16} {'first':>9} {'last':>9} {'min':>9} {'max':>9} {'per hour':>11} "
      f"{'threshold':>10}  verdict")
growing = []
for name, unit, threshold in series:
    ys = [r[name] for r in tail]
    per_hour = slope([r["t"] for r in tail], ys) * 3600
    if threshold is None:
        verdict = "(info)"
    elif threshold == "bounded":
        verdict = "flat" if max(ys) <= pipe_bound else "GROWING"
        if verdict == "GROWING":
            growing.append(name)
        threshold = f"<= {pipe_bound:.0f}"
    elif per_hour < threshold:
        verdict = "flat"
    else:
        verdict = "GROWING"
        growing.append(name)
    th = "-" if threshold is None else f"{threshold} {unit}"
    print(f"{name:<16} {ys[0]:>9.0f} {ys[-1]:>9.0f} {min(ys):>9.0f} {max(ys):>9.0f} "
          f"{per_hour:>+11.1f} {th:>10}  {verdict}")
print(f"load runs: {runs - failed_runs} of {runs} succeeded")
if growing or failed_runs:
    print("RESULT: " + ", ".join(
        ([f"growing: {' '.join(growing)}"] if growing else [])
        + ([f"{failed_runs} load run(s) failed (see the logs)"] if failed_runs else [])))
    sys.exit(1)
print("RESULT: flat")
EOF
