#!/usr/bin/env bash
# The live-ingest benchmark: `twinwatch run` consuming `twinwatch emulator` over loopback
# (4 partitions, Microsoft's Rust client, the baseline policy, alerts to a file).
#
#   benches/live.sh [EVENTS] [RATE] [SECONDS]
#
# 1. Throughput: EVENTS (default 500000) generated events preloaded into the emulator; the
#    time until the service has consumed them all (from its /metrics), as events/s, from the
#    service's start and from its first consumed events (start-up excluded).
# 2. Latency: the emulator publishes generated events at RATE (default 5000/s, enqueued when
#    published); after a 10 s warm-up, for SECONDS (default 30), the service's histogram
#    twinwatch_enqueue_to_alert_seconds (from an event's enqueue to its alerts being on disk in
#    the alert file) gives the median and p99.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-500000}
rate=${2:-5000}
seconds=${3:-30}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinwatch-target}"
# TWINWATCH_BIN=PATH measures another build (to compare a change with the one before it).
if [ -z "${TWINWATCH_BIN:-}" ]; then cargo build --release --quiet; fi
bin="${TWINWATCH_BIN:-$CARGO_TARGET_DIR/release/twinwatch}"
dir="${BENCH_DIR:-/tmp/twinwatch-live-bench}"
rm -rf "$dir"; mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# metric_into VAR METRIC PORT: VAR = the sum of METRIC's samples on the service's /metrics (0
# while it does not answer). Pure bash (/dev/tcp, no curl or awk): the poll forks nothing, so it
# takes next to none of the two cores the service and the emulator share.
metric_into() {
  local line s=0
  if ! exec 9<>"/dev/tcp/127.0.0.1/$3"; then printf -v "$1" 0; return 0; fi 2>/dev/null
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&9
  while IFS= read -r line <&9; do
    [[ $line == "$2"* ]] && s=$((s + ${line##* }))
  done
  exec 9<&-
  printf -v "$1" %s "$s"
}
# nap: a 0.1 s pause without forking sleep(1).
exec {nap_fd}<> <(:)
nap() { read -rt 0.1 -u "$nap_fd" || true; }

# Starts the emulator (args: extra emulator args) and sets `cs` to its connection string. Not
# called in $(...): a subshell would keep the emulator's pid out of `pids`, and the emulator
# would outlive the script.
start_emulator() {
  : > "$dir/emulator.out"
  "$bin" emulator --listen 127.0.0.1:0 --hub bench --partitions 4 "$@" > "$dir/emulator.out" 2> "$dir/emulator.err" &
  pids+=($!)
  for _ in $(seq 1 600); do [ -s "$dir/emulator.out" ] && break; sleep 0.1; done
  cs=$(head -1 "$dir/emulator.out")
}

# 1. Throughput.
"$bin" generate --devices $((events / 10)) --events "$events" --seed 3 --out "$dir/fleet.json" 2>/dev/null
start_emulator "$dir/fleet.json"
start=$EPOCHREALTIME
TWINWATCH_EVENTHUB_CONNECTION_STRING="$cs" "$bin" run --data-dir "$dir/data1" --listen 127.0.0.1:29501 \
  --alerts-file "$dir/alerts1.jsonl" 2> "$dir/run1.err" &
pids+=($!); run1=$!
# The first sample after consuming began: the steady rate excludes start-up (opening the store,
# connecting, attaching the receivers).
first=""; first_n=0
while true; do
  metric_into n twinwatch_messages_total 29501
  if [ -z "$first" ] && [ "$n" -gt 0 ]; then first=$EPOCHREALTIME; first_n=$n; fi
  [ "$n" -ge "$events" ] && break
  nap
done
end=$EPOCHREALTIME
kill -TERM "$run1" 2>/dev/null || true; wait "$run1" 2>/dev/null || true
kill "${pids[0]}" 2>/dev/null || true; wait "${pids[0]}" 2>/dev/null || true
pids=()
python3 -c "print(f'throughput: {$events} events in {$end - $start:.2f} s from the start: {$events / ($end - $start):,.0f} events/s; once consuming: {$events - $first_n} in {$end - $first:.2f} s: {($events - $first_n) / ($end - $first):,.0f} events/s')"

# The same events replayed from the file by the same binary, right after: the target is live at
# 50 % or more of this.
rm -rf "$dir/replay-data"
"$bin" replay --data-dir "$dir/replay-data" --summary "$dir/replay.json" "$dir/fleet.json" > "$dir/replay.out" 2>&1
python3 - "$dir/replay.out" "$events" "$start" "$end" <<'PY'
import re, sys
seconds = float(re.search(r"in ([\d.]+) s", open(sys.argv[1]).read()).group(1))
events, live = int(sys.argv[2]), float(sys.argv[4]) - float(sys.argv[3])
print(f"replay of the same events: {events / seconds:,.0f} events/s; live from the start is "
      f"{100 * seconds / live:.0f} % of it")
PY

# LIVE_THROUGHPUT_ONLY=1 stops here.
[ -n "${LIVE_THROUGHPUT_ONLY:-}" ] && exit 0

# 2. Latency at a steady rate.
start_emulator --rate "$rate" --devices 20000 --seed 5
TWINWATCH_EVENTHUB_CONNECTION_STRING="$cs" "$bin" run --data-dir "$dir/data2" --listen 127.0.0.1:29502 \
  --alerts-file "$dir/alerts2.jsonl" 2> "$dir/run2.err" &
pids+=($!)
sleep 10
curl -s http://127.0.0.1:29502/metrics | grep '^twinwatch_enqueue_to_alert_seconds' > "$dir/before.txt"
metric_into m0 twinwatch_messages_total 29502
sleep "$seconds"
curl -s http://127.0.0.1:29502/metrics | grep '^twinwatch_enqueue_to_alert_seconds' > "$dir/after.txt"
metric_into m1 twinwatch_messages_total 29502
python3 - "$dir/before.txt" "$dir/after.txt" "$m0" "$m1" "$seconds" <<'PY'
import re, sys
def buckets(path):
    out = {}
    for line in open(path):
        m = re.match(r'twinwatch_enqueue_to_alert_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            out[float('inf') if m.group(1) == '+Inf' else float(m.group(1))] = float(m.group(2))
    return out
b0, b1 = buckets(sys.argv[1]), buckets(sys.argv[2])
edges = sorted(b1)
counts = [b1[e] - b0.get(e, 0) for e in edges]
total = counts[-1]
def quantile(q):
    target, prev_edge, prev_count = q * total, 0.0, 0.0
    for edge, count in zip(edges, counts):
        if count >= target:
            if edge == float('inf'):
                return float('inf')
            return prev_edge + (edge - prev_edge) * (target - prev_count) / max(count - prev_count, 1e-9)
        prev_edge, prev_count = edge, count
    return float('inf')
rate = (int(sys.argv[4]) - int(sys.argv[3])) / float(sys.argv[5])
print(f"steady state: {rate:,.0f} events/s consumed; {total:.0f} alerts; enqueue-to-alert median {quantile(0.5)*1000:.0f} ms, p99 {quantile(0.99)*1000:.0f} ms")
PY
