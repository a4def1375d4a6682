#!/usr/bin/env bash
# holdfast in one command: build, start two echo backends and the balancer in front of them,
# send a few connections through, show which backend answered each, then stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
bin=target/release
pids=()
logs=()
cleanup() {
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    if ((${#logs[@]})); then rm -f "${logs[@]}"; fi
}
trap cleanup EXIT

# `start VAR CMD...` starts CMD, which prints "listening on ADDR", and sets VAR to that address.
# It runs in this shell, not in a `$(...)` subshell, so the pid it records is the one the
# cleanup kills (a `pids+=` inside `$(...)` would be lost with the subshell).
start() {
    local var=$1 out
    shift
    out=$(mktemp)
    logs+=("$out")
    "$@" >"$out" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        if grep -q "listening on" "$out"; then
            printf -v "$var" '%s' "$(grep -o "listening on [^ ]*" "$out" | head -1 | cut -d' ' -f3)"
            return
        fi
        sleep 0.05
    done
    echo "failed to start: $*" >&2; cat "$out" >&2; exit 1
}

start a $bin/holdfast-load echo-server --listen 127.0.0.1:0 --banner "hello from backend A"
start b $bin/holdfast-load echo-server --listen 127.0.0.1:0 --banner "hello from backend B"
echo "backends: A=$a B=$b"

start lb $bin/holdfast --listen 127.0.0.1:0 --backend "$a" --backend "$b" --algorithm round-robin --workers 1
port=${lb##*:}
echo "holdfast is listening on $lb (round-robin over A and B)"
for i in 1 2 3 4; do
    exec 3<>/dev/tcp/127.0.0.1/$port
    read -r -t 5 banner <&3
    printf 'ping %s\n' "$i" >&3
    read -r -t 5 reply <&3
    exec 3>&-
    echo "connection $i: banner '$banner', echo '$reply'"
done
echo "done; stopping."
