#!/usr/bin/env bash
# The long chaos suite: every scenario against release builds, one after another (about 50
# minutes with the default durations). Reports and node logs go to $OUT (default
# ./chaos-reports/<date>); the script exits non-zero if any scenario found an anomaly.
#
#   ./scripts/chaos-long.sh                 # all scenarios, default durations
#   SCALE=2 ./scripts/chaos-long.sh         # every duration doubled (90 minutes)
#   SEED=1234 ./scripts/chaos-long.sh       # reproduce a run
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo's own default (./target) unless the caller chose one: the README's `cargo run --release`
# builds there too, so RocksDB is compiled once for both.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
SCALE="${SCALE:-1}"
SEED="${SEED:-$(date +%s)}"
OUT="${OUT:-chaos-reports/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
cargo build --release --locked -p stemedb -p stemedb-chaos
CHAOS="$CARGO_TARGET_DIR/release/stemedb-chaos"

# scenario:seconds
RUNS="smoke:240 crashes:300 partitions:300 links:300 leaders:240 membership:300 wipe:240 disk:240 corrupt:240 rot:240 all:600"
failed=0
printf '%-12s %8s %6s %10s %10s %10s %8s %s\n' scenario seconds faults writes_ok reads_ok set_acked result report > "$OUT/summary.txt"
for run in $RUNS; do
  name="${run%%:*}"
  seconds=$(( ${run##*:} * SCALE ))
  echo "=== $name for ${seconds}s (seed $SEED)"
  if "$CHAOS" run --scenario "$name" --duration "$seconds" --seed "$SEED" \
      --report "$OUT/$name.json" --data-dir "$OUT/$name-data" > "$OUT/$name.log" 2>&1; then
    result=PASS
    rm -rf "$OUT/$name-data"   # keep node logs only for failed runs
  else
    result=FAIL
    failed=1
  fi
  tail -n 8 "$OUT/$name.log"
  python3 - "$OUT/$name.json" "$name" "$seconds" "$result" >> "$OUT/summary.txt" <<'PY' || echo "$name $seconds - - - - $result (no report)" >> "$OUT/summary.txt"
import json, sys
path, name, seconds, result = sys.argv[1:]
r = json.load(open(path))
ops = r["register_ops"]
print(f'{name:<12} {seconds:>8} {len(r["faults"]):>6} {ops["writes_ok"]:>10} {ops["reads_ok"]:>10} {r["set"]["acknowledged"]:>10} {result:>8} {path}')
PY
done
cat "$OUT/summary.txt"
exit $failed
