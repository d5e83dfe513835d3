#!/usr/bin/env bash
# Whole-snapshot passes end to end, by the release binary: a re-audit (a changed policy on a
# replayed fleet), a seed pass of that fleet's twins into an empty directory, and the `audit`
# dry run. Reports twins (documents) per second and peak RSS of each.
#
#   benches/passes.sh [DEVICES] [EVENTS]
#
# Defaults: 200,000 devices and 2,000,000 messages (about 400,000 twins), the fleet of
# benches/replay.sh, kept in ${BENCH_DIR:-/tmp/twinwatch-bench} with the replayed snapshot.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-200000}
events=${2:-2000000}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinwatch-target}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/twinwatch"
dir="${BENCH_DIR:-/tmp/twinwatch-bench}"
mkdir -p "$dir"
fleet="$dir/fleet-$devices-$events.json"
if [ ! -s "$fleet" ]; then
  "$bin" generate --devices "$devices" --events "$events" --seed 1 --noise 0.02 --out "$fleet"
fi
base="$dir/passes-base-$devices-$events"
if [ ! -d "$base" ]; then
  "$bin" replay --data-dir "$base" "$fleet"
fi
documents="$dir/documents-$devices-$events.json"
if [ ! -s "$documents" ]; then
  "$bin" export --data-dir "$base" > "$documents"
fi
# The baseline with one rule renamed (resolved everywhere, opened anew), one severity changed
# and a rule added that every module twin fails.
changed="$dir/changed-policy.yaml"
sed -e '0,/  - id: device.security-module-present/s//  - id: device.security-module-present-v2/' \
    -e '0,/severity: medium/s//severity: critical/' policies/security-twin-baseline.yaml > "$changed"
printf '  - id: module.owner-tagged\n    severity: low\n    target: {module: "*"}\n    check: {path: /tags/owner, op: exists}\n' >> "$changed"
"$bin" policy check "$changed"

peak() { grep -E "Maximum resident" "$1" | awk '{printf "%.0f MiB", $NF / 1024}'; }

echo "== re-audit ($(wc -l < "$documents") twins)"
rm -rf "$dir/passes-work"
cp -r "$base" "$dir/passes-work"
RUST_LOG=info /usr/bin/time -v "$bin" --log-format text replay --data-dir "$dir/passes-work" \
  --policy "$changed" "$fleet" > /dev/null 2> "$dir/reaudit.txt"
grep -o "re-audit done.*" "$dir/reaudit.txt" | sed 's/\x1b\[[0-9;]*m//g'
echo "peak RSS $(peak "$dir/reaudit.txt")"

echo "== audit (dry run)"
/usr/bin/time -v "$bin" audit --data-dir "$base" --policy "$changed" --format json \
  > /dev/null 2> "$dir/audit.txt"
grep -E "Elapsed" "$dir/audit.txt"
echo "peak RSS $(peak "$dir/audit.txt")"

echo "== seed pass of every twin into an empty directory"
rm -rf "$dir/passes-seed"
/usr/bin/time -v "$bin" seed --data-dir "$dir/passes-seed" --hub contoso-hub \
  --as-of 2030-01-01T00:00:00Z --summary "$dir/seed.json" "$documents" > /dev/null 2> "$dir/seed.txt"
python3 - "$dir/seed.json" "$dir/seed.txt" <<'PY'
import json, re, sys
summary = json.load(open(sys.argv[1]))
text = open(sys.argv[2]).read()
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
print(f"documents {summary['documents']}, applied {summary['applied']}, evaluated {summary['evaluated']}, "
      f"wall {seconds:.2f} s, {summary['documents'] / seconds:,.0f} documents/s")
PY
echo "peak RSS $(peak "$dir/seed.txt")"
