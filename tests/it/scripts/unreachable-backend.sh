#!/usr/bin/env bash
# Run inside a network namespace of its own (`unshare -n`): an echo backend on 127.0.0.5,
# holdfast in front of it with the given flags, one client session through it; then the
# backend becomes unreachable (127.0.0.5 leaves the local routes, so holdfast's segments to it
# go nowhere and nothing is acknowledged) while the client sends. Prints either
# `closed after N ms` (holdfast gave the session up) or `still open after N ms`.
#
#   unreachable-backend.sh HOLDFAST HOLDFAST_LOAD WAIT_SECONDS [HOLDFAST FLAGS...]
set -euo pipefail
holdfast=$1 load=$2 wait_s=$3
shift 3
tmp=$(mktemp -d)
trap 'kill -KILL $(jobs -p) 2>/dev/null; wait; rm -rf "$tmp"' EXIT
ip link set lo up
"$load" echo-server --listen 127.0.0.5:0 >"$tmp/echo.out" 2>&1 &
until grep -q "^listening on " "$tmp/echo.out"; do sleep 0.02; done
backend=$(sed -n 's/^listening on //p' "$tmp/echo.out" | head -n 1)
"$holdfast" --listen 127.0.0.1:0 --backend "$backend" --health-check none "$@" 2>"$tmp/hf.err" &
until grep -q "listening on " "$tmp/hf.err"; do sleep 0.02; done
front=$(grep -o "listening on [0-9.]*:[0-9]*" "$tmp/hf.err" | head -n 1 | cut -d' ' -f3)
exec 3<>"/dev/tcp/${front%:*}/${front##*:}"
echo hello >&3
read -r -t 5 line <&3
[ "$line" = hello ] || { echo "no echo before the cut: '$line'"; exit 1; }
ip route del local 127.0.0.0/8 dev lo table local
start=$(date +%s%N)
head -c 1000 /dev/zero >&3
set +e
timeout "$wait_s" cat <&3 >/dev/null 2>&1
status=$?
set -e
elapsed=$((($(date +%s%N) - start) / 1000000))
if [ "$status" -eq 124 ]; then
    echo "still open after $elapsed ms"
else
    echo "closed after $elapsed ms"
fi
