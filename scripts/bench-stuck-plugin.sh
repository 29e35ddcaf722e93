#!/usr/bin/env bash
# Measures what a stuck plugin costs everyone else: `quiver bench produce --rate` latency
# on one topic, first alone, then while three consumers keep running the hostile
# `examples/plugins/backtrack` processor (exponential pattern backtracking) on another.
# Usage: scripts/bench-stuck-plugin.sh [RATE] [RECORDS] [RECORD_SIZE] [QUARANTINE_MS]
# Each consumer is a `quiver consume --processor backtrack` that fails (PluginFailed) and is
# restarted after 200 ms, as a user's retry loop would; QUARANTINE_MS (default: the broker's
# default, 10000) sets `plugins.quarantine_ms`, e.g. 1 to make every call run the plugin.
# Env: QUIVER_BIN (default target/release/quiver). Prints both JSON reports and the p99 ratio.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rate=${1:-20000}
records=${2:-200000}
size=${3:-1024}
quarantine=${4:-}
bin=${QUIVER_BIN:-target/release/quiver}
[ -x "$bin" ] || { echo "build first: cargo build --release (or set QUIVER_BIN)" >&2; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
config=()
if [ -n "$quarantine" ]; then
    printf '[plugins]\nquarantine_ms = %s\n' "$quarantine" >"$work/broker.toml"
    config=(--config "$work/broker.toml")
fi
"$bin" broker start "${config[@]}" --data-dir "$work/data" --listen "127.0.0.1:$port" >"$work/broker.log" 2>&1 &
broker=$!
loops=()
cleanup() {
    for p in "${loops[@]}"; do kill "$p" 2>/dev/null || true; done
    kill "$broker" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
export QUIVER_BOOTSTRAP="127.0.0.1:$port" QUIVER_CA="$work/data/tls/ca.pem"
for _ in $(seq 1 200); do
    "$bin" topic list >/dev/null 2>&1 && break
    sleep 0.1
done
"$bin" topic create stuck >/dev/null
printf 'x\ny\nz\n' | "$bin" produce stuck >/dev/null
"$bin" plugin deploy examples/plugins/backtrack >/dev/null
bench() {
    "$bin" bench produce --bootstrap "127.0.0.1:$port" --rate "$rate" --records "$records" \
        --record-size "$size" --output json
}
alone=$(bench)
for i in 1 2 3; do
    (
        while true; do
            "$bin" consume stuck --from-beginning --processor backtrack --max-messages 1 \
                >/dev/null 2>>"$work/consumer-$i.err" || true
            sleep 0.2
        done
    ) &
    loops+=($!)
done
sleep 2
stuck=$(bench)
failures=$(cat "$work"/consumer-*.err | grep -c PluginFailed || true)
echo "alone:      $alone"
echo "with stuck: $stuck"
echo "consumer calls answered PluginFailed meanwhile: $failures"
python3 - "$alone" "$stuck" <<'PY'
import json, sys
a, s = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"p50 {a['p50_ms']:.2f} -> {s['p50_ms']:.2f} ms; p99 {a['p99_ms']:.2f} -> {s['p99_ms']:.2f} ms "
      f"(x{s['p99_ms'] / max(a['p99_ms'], 1e-9):.2f}); rate {a['records_per_sec']:.0f} -> {s['records_per_sec']:.0f} rec/s")
PY
