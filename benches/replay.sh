#!/usr/bin/env bash
# The end-to-end replay benchmark: a generated fleet replayed into a fresh RocksDB snapshot by
# the release binary; reports messages per second and peak RSS.
#
#   benches/replay.sh [DEVICES] [EVENTS] [EXTRA REPLAY ARGS...]
#
# Defaults: 200,000 devices and 2,000,000 messages. The fleet file is kept in
# ${BENCH_DIR:-/tmp/twinwatch-bench} and reused when it already exists; it is read once before
# the timed run so that the page cache, not the disk, feeds the replay.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-200000}
events=${2:-2000000}
shift $(( $# > 2 ? 2 : $# ))
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinwatch-target}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/twinwatch"
dir="${BENCH_DIR:-/tmp/twinwatch-bench}"
mkdir -p "$dir"
fleet="$dir/fleet-$devices-$events.json"
if [ ! -s "$fleet" ]; then
  "$bin" generate --devices "$devices" --events "$events" --seed 1 --noise 0.02 --out "$fleet"
fi
cat "$fleet" > /dev/null
rm -rf "$dir/data"
/usr/bin/time -v "$bin" replay --data-dir "$dir/data" --summary "$dir/summary.json" "$@" "$fleet" \
  2> "$dir/time.txt"
grep -E "Elapsed|Maximum resident|Percent of CPU" "$dir/time.txt"
python3 - "$dir/summary.json" "$dir/time.txt" <<'PY'
import json, re, sys
summary = json.load(open(sys.argv[1]))
text = open(sys.argv[2]).read()
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
print(f"messages {summary['messages']}, applied {summary['applied']}, wall {seconds:.2f} s, "
      f"{summary['messages'] / seconds:,.0f} messages/s, peak RSS {rss_kb / 1024:.0f} MiB")
PY
du -sh "$dir/data"
