#!/usr/bin/env bash
# A seed pass of the service (`twinwatch run` with [seed]) beside its feed, end to end with the
# release binary: `twinwatch emulator` serves a generated fleet's retained events and its twin
# query (the fleet as of those events); the service starts on an empty snapshot, seeds it and
# consumes the events at the same time. Reports the pass's time, the time to consume every
# event (then again without seeding, for comparison) and the apply thread's time per seed step
# (`twinwatch_seed_step_duration_seconds`: how long the feed waits for seeding at most).
#
#   benches/seed_service.sh [DEVICES] [EVENTS]
#
# Defaults: 100,000 devices and 700,000 events (about 195,000 twins). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-100000}
events=${2:-700000}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinwatch-target}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/twinwatch"
work=$(mktemp -d)
emulator=
service=
cleanup() {
  [ -n "$service" ] && kill "$service" 2>/dev/null || true
  [ -n "$emulator" ] && kill "$emulator" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port=19555

metrics() { curl -s "127.0.0.1:$port/metrics" || true; }

# $1: seed or noseed
one_run() {
  : > "$work/emulator.out"
  "$bin" emulator --listen 127.0.0.1:0 --hub contoso-hub --devices "$devices" --events "$events" \
    --seed 1 > "$work/emulator.out" 2> "$work/emulator.err" &
  emulator=$!
  until [ "$(wc -l < "$work/emulator.out")" -ge 5 ]; do sleep 0.5; done
  local eventhub iothub endpoint
  eventhub=$(head -1 "$work/emulator.out")
  iothub=$(grep '^iothub-connection-string: ' "$work/emulator.out" | cut -d' ' -f2-)
  endpoint=$(grep '^iothub-endpoint-http: ' "$work/emulator.out" | cut -d' ' -f2-)
  if [ "$1" = seed ]; then
    printf '[seed]\nendpoint = "%s"\nreconcile_every_hours = 0\n' "$endpoint" > "$work/run.toml"
  else
    : > "$work/run.toml"
    iothub=
  fi
  rm -rf "$work/data"
  local started ended passed n
  started=$(date +%s.%N)
  TWINWATCH_EVENTHUB_CONNECTION_STRING="$eventhub" TWINWATCH_IOTHUB_CONNECTION_STRING="$iothub" \
    RUST_LOG=info "$bin" run --config "$work/run.toml" --data-dir "$work/data" \
    --listen "127.0.0.1:$port" 2> "$work/run.err" &
  service=$!
  while true; do
    n=$(metrics | awk '/^twinwatch_messages_total\{/ {s += $2} END {print s + 0}')
    [ "$n" -ge "$events" ] && break
    sleep 0.2
  done
  ended=$(date +%s.%N)
  if [ "$1" = seed ]; then
    until metrics | grep -q '^twinwatch_seed_passes_total{outcome="complete"} 1'; do sleep 0.2; done
    grep -a '"seed pass ended"' "$work/run.err" | sed 's/^/  /'
    local t0 t1
    t0=$(grep -a '"seed pass begins' "$work/run.err" | grep -o '"timestamp":"[^"]*"' | cut -d'"' -f4)
    t1=$(grep -a '"seed pass ended' "$work/run.err" | grep -o '"timestamp":"[^"]*"' | cut -d'"' -f4)
    passed=$(echo "$(date +%s.%N -d "$t1") - $(date +%s.%N -d "$t0")" | bc)
    echo "  seed pass: ${passed} s (begin to end, from the log)"
    metrics | grep -E '^twinwatch_seed_step_duration_seconds_(bucket\{le="0.05"\}|bucket\{le="0.1"\}|bucket\{le="0.25"\}|count|sum)' | sed 's/^/  /'
  fi
  echo "  $events events consumed in $(echo "$ended - $started" | bc) s ($1)"
  kill -TERM "$service"; wait "$service" || true; service=
  kill -INT "$emulator"; wait "$emulator" || true; emulator=
}

echo "fleet: $devices devices, $events events"
one_run seed
one_run noseed
