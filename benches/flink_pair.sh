#!/usr/bin/env bash
# twinwatch replay beside the performance peer, Apache Flink 2.3 with EmbeddedRocksDB keyed
# state (benches/flink/src/TwinJobIotHub.java: the same storage-route JSON lines, the same apply
# rules, the same 6 rules as benches/flink/iothub_policy6.yaml), on the same file, alternately,
# whole processes. Prints each run and the ratio of the medians.
#
#   benches/flink_pair.sh [DEVICES] [EVENTS] [ROUNDS]
#
# Defaults: 200,000 devices, 1,000,000 events, 3 rounds (each: twinwatch, then Flink). Needs a
# JDK (Debian: default-jdk-headless) and pip; Flink's jars come from PyPI
# (apache-flink-libraries) into ${FLINK_DIR:-/tmp/twinwatch-flink}, once. The fleet file is
# kept in ${BENCH_DIR:-/tmp/twinwatch-bench}. Each run waits (up to 60 s) for the machine to be
# quiet first; the figures are only comparable within one invocation.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-200000}
events=${2:-1000000}
rounds=${3:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinwatch-target}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/twinwatch"
dir="${BENCH_DIR:-/tmp/twinwatch-bench}"
flink="${FLINK_DIR:-/tmp/twinwatch-flink}"
peer="$PWD/benches/flink"
mkdir -p "$dir" "$flink"

# The peer: Flink's jars, then the job compiled against them.
if [ ! -s "$flink/classpath.txt" ]; then
  python3 -m pip download -q --no-deps apache-flink-libraries==2.3.0 -d "$flink/dl"
  rm -rf "$flink/whl" && mkdir -p "$flink/whl"
  (cd "$flink/whl" && unzip -q "$flink"/dl/*.whl)
  ls "$flink"/whl/pyflink/lib/*.jar | tr '\n' ':' | sed 's/:$//' > "$flink/classpath.txt"
fi
mkdir -p "$flink/classes"
javac -d "$flink/classes" -cp "$(cat "$flink/classpath.txt")" "$peer"/src/*.java

fleet="$dir/fleet-$devices-$events.jsonl"
if [ ! -s "$fleet" ]; then
  "$bin" generate --devices "$devices" --events "$events" --seed 1 --out "$fleet"
fi
cat "$fleet" > /dev/null

busy_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
# Waits until the machine's cores are under 10 % busy for 6 s (at most 60 s).
wait_quiet() {
  local waited=0 quiet=0 a b
  local cores
  cores=$(nproc)
  while [ $waited -lt 60 ]; do
    a=$(busy_jiffies); sleep 2; b=$(busy_jiffies)
    if [ $(( (b - a) * 100 / (200 * cores) )) -lt 10 ]; then quiet=$((quiet + 2)); else quiet=0; fi
    [ $quiet -ge 6 ] && return 0
    waited=$((waited + 2))
  done
  echo "  (the machine was not quiet: figures of this run are noisy)"
}
# Wall seconds of a /usr/bin/time -v report.
wall() {
  python3 -c '
import re, sys
t = open(sys.argv[1]).read()
m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", t)
r = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)
c = re.search(r"Percent of CPU this job got: (\d+)%", t)
print(int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3)), int(r.group(1)) // 1024, c.group(1))
' "$1"
}

tw_walls=()
flink_walls=()
for round in $(seq 1 "$rounds"); do
  wait_quiet
  rm -rf "$dir/pair-data"
  /usr/bin/time -v "$bin" replay --data-dir "$dir/pair-data" --policy "$peer/iothub_policy6.yaml" \
    --summary "$dir/pair-summary.json" "$fleet" > /dev/null 2> "$dir/pair-tw.time"
  read -r secs rss cpu < <(wall "$dir/pair-tw.time")
  tw_walls+=("$secs")
  alerts=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["alerts"]["opened"], s["alerts"]["resolved"])' "$dir/pair-summary.json" 2>/dev/null || echo "?")
  printf 'round %s  twinwatch  %6.2f s  %7.0f events/s  %4s %% CPU  %5s MiB  alerts opened/resolved %s\n' \
    "$round" "$secs" "$(echo "$events / $secs" | bc -l)" "$cpu" "$rss" "$alerts"

  wait_quiet
  rm -rf "$flink/rocksdb"
  (cd "$flink" && /usr/bin/time -v java -Xmx4g -XX:+UseG1GC \
    -Dlog4j.configurationFile="$peer/log4j2.properties" \
    -cp "classes:$(cat classpath.txt)" TwinJobIotHub "$fleet" 2 0 512m "$flink/rocksdb" rocksdb \
    > "$dir/pair-flink.log" 2> "$dir/pair-flink.time")
  read -r secs rss cpu < <(wall "$dir/pair-flink.time")
  flink_walls+=("$secs")
  result=$(grep -o 'opened=[0-9]* resolved=[0-9]*.*eventsPerSec(net)=[0-9]*' "$dir/pair-flink.log" | sed 's/ accounted=[a-z]*//; s/ netRuntimeMs=[0-9]*//; s/ executeWallMs=[0-9]*//')
  printf 'round %s  flink      %6.2f s  %7.0f events/s  %4s %% CPU  %5s MiB  %s\n' \
    "$round" "$secs" "$(echo "$events / $secs" | bc -l)" "$cpu" "$rss" "$result"
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
tw=$(median "${tw_walls[@]}")
fl=$(median "${flink_walls[@]}")
printf 'median wall: twinwatch %.2f s, flink %.2f s: twinwatch is %.2f times as fast (whole processes)\n' \
  "$tw" "$fl" "$(echo "$fl / $tw" | bc -l)"
