#!/usr/bin/env bash
# The cost of TLS (issue 20): a 3-node cluster on 127.0.0.1-3 (ports 18180-18182, replication
# factor 3, fsync on) loaded by `stemedb bench` with 64 writers and 256-byte values, in turn
# without TLS (plain), with mutual TLS between the nodes (mtls: cluster.tls_*), and with HTTPS on
# the client API (https: server.tls_*, the load over https:// with --ca), ROUNDS times each, with
# a CA and certificates made for the run; prints writes/s and p50/p99/p999 of every run.
#
#   scripts/bench-tls.sh [ROUNDS (2)] [SECONDS (15)]
#
# STEMEDB_BIN: the binary (default: $CARGO_TARGET_DIR/release/stemedb, else target/release).
set -euo pipefail
ROUNDS=${1:-2}
SECONDS_PER_RUN=${2:-15}
BIN=${STEMEDB_BIN:-${CARGO_TARGET_DIR:-target}/release/stemedb}
[ -x "$BIN" ] || { echo "no stemedb binary at $BIN (set STEMEDB_BIN)" >&2; exit 1; }
WORK=$(mktemp -d)
PIDS=()
stop_nodes() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
trap 'stop_nodes; rm -rf "$WORK"' EXIT
"$BIN" certs create-ca --dir "$WORK/ca" >/dev/null
"$BIN" certs create-node --ca "$WORK/ca" --out "$WORK" --name node >/dev/null
"$BIN" certs create-node --ca "$WORK/ca" --out "$WORK" --name web --host 127.0.0.1 --host 127.0.0.2 --host 127.0.0.3 >/dev/null
CLUSTER="1=127.0.0.1:18182,2=127.0.0.2:18182,3=127.0.0.3:18182"
scheme() { if [ "$1" = https ]; then echo https; else echo http; fi; }

start_cluster() { # $1: plain|mtls|https
  rm -rf "$WORK/data"
  for i in 1 2 3; do
    env_tls=()
    if [ "$1" = mtls ]; then
      env_tls=(STEMEDB_CLUSTER_TLS_CA_FILE="$WORK/ca/ca.pem" STEMEDB_CLUSTER_TLS_CERT_FILE="$WORK/node.pem"
               STEMEDB_CLUSTER_TLS_KEY_FILE="$WORK/node-key.pem")
    elif [ "$1" = https ]; then
      env_tls=(STEMEDB_SERVER_TLS_CERT_FILE="$WORK/web.pem" STEMEDB_SERVER_TLS_KEY_FILE="$WORK/web-key.pem")
    fi
    env -u STEMEDB_BIN "${env_tls[@]}" STEMEDB_LOGGING_LEVEL=warn STEMEDB_CIRCUIT_BREAKER_MAX_WRITES_PER_SEC=1000000 \
      "$BIN" serve --node-id "$i" --data-dir "$WORK/data/node$i" --initial-cluster "$CLUSTER" \
      --api-addr "127.0.0.$i:18180" --admin-addr "127.0.0.$i:18181" --raft-addr "127.0.0.$i:18182" \
      >"$WORK/node$i-$1.log" 2>&1 &
    PIDS+=($!)
  done
  for _ in $(seq 1 120); do
    if curl -sf --cacert "$WORK/ca/ca.pem" "$(scheme "$1")://127.0.0.1:18181/cluster/health" 2>/dev/null | grep -q '"healthy"'; then return 0; fi
    sleep 0.5
  done
  echo "cluster ($1) never became healthy" >&2
  tail -n 20 "$WORK"/node1-"$1".log >&2
  exit 1
}

printf '%-6s %-5s %10s %9s %9s %9s\n' round tls 'writes/s' 'p50 ms' 'p99 ms' 'p999 ms'
for round in $(seq 1 "$ROUNDS"); do
  for mode in plain mtls https; do
    start_cluster "$mode"
    s=$(scheme "$mode")
    out=$("$BIN" bench --url "$s://127.0.0.1:18180,$s://127.0.0.2:18180,$s://127.0.0.3:18180" --ca "$WORK/ca/ca.pem" \
      --writers 64 --duration "$SECONDS_PER_RUN" --value-size 256 --json)
    echo "$out" | python3 -c '
import json, sys
r = json.load(sys.stdin)
w = next(s for s in r["results"] if s["name"] == "write")
errors = sum(w["errors"].values()) if w["errors"] else 0
print("%-6s %-5s %10.0f %9.2f %9.2f %9.2f  errors %d" % (sys.argv[1], sys.argv[2], w["ops_per_sec"], w["p50_ms"], w["p99_ms"], w["p999_ms"], errors))
' "$round" "$mode"
    stop_nodes
  done
done
