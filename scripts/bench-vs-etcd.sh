#!/usr/bin/env bash
# Side by side: a 3-node StemeDB and a 3-member etcd (Debian's etcd-server) on 127.0.0.1-3 of
# this machine, both with fsync on, loaded by the same client (`stemedb bench`, --target etcd
# for etcd: gRPC Put and Range) with the same workload shape, alternating the two systems in
# each round. Prints every run and, per workload, the medians and their ratio, and the CPU time
# the servers used per operation (the three nodes, members, or nginx and its workers; from
# /proc). Reports only: nothing here asserts a timing.
#
#   scripts/bench-vs-etcd.sh [--rounds N] [--seconds S] [--out DIR] [--server-bin PATH] [--shards N]
#
# --shards sets the StemeDB cluster's shard count (cluster.shards, default 16). Each shard is
# its own Raft group; etcd is one. Fewer shards let each group's round (log append, fsync,
# AppendEntries, commit, apply) carry more writes: docs/performance.md measures 1, 4 and 16.
#
# --server-bin runs the nodes from another stemedb binary (an older build, to compare), while
# the client stays this build's `stemedb bench`.
#
# Workloads (docs/performance.md): 64 clients of single writes (256-byte values, 10,000 keys),
# 1 client of single writes, and 64 clients of linearizable reads of those keys; then the same
# reads of 10,000 other keys written once at the start. A StemeDB write adds a claim to its key
# (an etcd put replaces the value), so by the reads of round 3 the first keys hold about 17
# claims each; the second set keeps one, and shows reads of fresh data beside them. Clients are
# spread over the three nodes / members: each of the 64 clients keeps to one, and the one client
# sends its requests to the three in turn (`--spread request`, as etcd's Go client balances).
# Both clusters run for the whole benchmark; the one not being measured is idle.
#
# The machine's floor runs in the same rounds: Debian's nginx on 127.0.0.1-3 answering every
# request `200 {}` at once (no storage, no replication), loaded by the same client with the same
# requests as StemeDB. No database over HTTP on these cores can pass its figures.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3
SECONDS_PER_RUN=20
OUT=""
SERVER_BIN=""
SHARDS=16
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --server-bin) SERVER_BIN="$2"; shift 2 ;;
    --shards) SHARDS="$2"; shift 2 ;;
    *) echo "usage: $0 [--rounds N] [--seconds S] [--out DIR] [--server-bin PATH] [--shards N]" >&2; exit 2 ;;
  esac
done
case "$ROUNDS$SECONDS_PER_RUN$SHARDS" in *[!0-9]*) echo "--rounds, --seconds and --shards take whole numbers" >&2; exit 2 ;; esac
[ "$ROUNDS" -ge 1 ] && [ "$SECONDS_PER_RUN" -ge 1 ] || { echo "--rounds and --seconds must be at least 1" >&2; exit 2; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for pkg in etcd-server etcd-client nginx python3 curl procps; do installed "$pkg" || missing+=("$pkg"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${STEMEDB_BIN:-}" ]; then
  cargo build --release --locked -p stemedb --bin stemedb
  STEMEDB_BIN="$CARGO_TARGET_DIR/release/stemedb"
fi
BIN="$STEMEDB_BIN"
SERVER_BIN="${SERVER_BIN:-$BIN}"
[ -x "$SERVER_BIN" ] || { echo "--server-bin $SERVER_BIN is not an executable" >&2; exit 2; }
unset STEMEDB_BIN   # nodes refuse unknown STEMEDB_* variables

WORK=$(mktemp -d /tmp/bench-vs-etcd.XXXXXX)
OUT="${OUT:-$WORK/results}"
mkdir -p "$OUT"
# The servers started, by system (each system's CPU is counted from its own; cleanup stops all).
STEMEDB_PIDS=()
ETCD_PIDS=()
FLOOR_PIDS=()
cleanup() {
  local pids=("${STEMEDB_PIDS[@]}" "${ETCD_PIDS[@]}" "${FLOOR_PIDS[@]}") pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK/stemedb" "$WORK/etcd" "$WORK/floor"
}
trap cleanup EXIT

# --- StemeDB: node i on 127.0.0.i, ports 18180 (API), 18181 (admin), 18182 (Raft) ---
CLUSTER="1=127.0.0.1:18182,2=127.0.0.2:18182,3=127.0.0.3:18182"
for i in 1 2 3; do
  ip=127.0.0.$i
  mkdir -p "$WORK/stemedb/n$i"
  # The per-agent circuit breaker off the path (etcd has none): bench agents write fast.
  STEMEDB_CLUSTER_SHARDS="$SHARDS" STEMEDB_CIRCUIT_BREAKER_MAX_WRITES_PER_SEC=10000000 "$SERVER_BIN" serve --node-id "$i" --data-dir "$WORK/stemedb/n$i" \
    --api-addr "$ip:18180" --admin-addr "$ip:18181" --raft-addr "$ip:18182" \
    --initial-cluster "$CLUSTER" >"$OUT/stemedb-n$i.log" 2>&1 &
  STEMEDB_PIDS+=($!)
done
# --- etcd: member i on 127.0.0.i, ports 2379 (client), 2380 (peer) ---
ETCD_CLUSTER="n1=http://127.0.0.1:2380,n2=http://127.0.0.2:2380,n3=http://127.0.0.3:2380"
for i in 1 2 3; do
  ip=127.0.0.$i
  etcd --name "n$i" --data-dir "$WORK/etcd/n$i" \
    --listen-peer-urls "http://$ip:2380" --initial-advertise-peer-urls "http://$ip:2380" \
    --listen-client-urls "http://$ip:2379" --advertise-client-urls "http://$ip:2379" \
    --initial-cluster "$ETCD_CLUSTER" --initial-cluster-token bench-vs-etcd \
    --initial-cluster-state new >"$OUT/etcd-n$i.log" 2>&1 &
  ETCD_PIDS+=($!)
done

# --- the floor: nginx answering every request at once, on 127.0.0.1-3:18190 ---
mkdir -p "$WORK/floor"
cat >"$WORK/floor/nginx.conf" <<NGINX
worker_processes 2;
pid $WORK/floor/nginx.pid;
error_log $WORK/floor/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/floor;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  server {
    listen 127.0.0.1:18190; listen 127.0.0.2:18190; listen 127.0.0.3:18190;
    location / { default_type application/json; return 200 '{}'; }
  }
}
NGINX
nginx -c "$WORK/floor/nginx.conf" -g 'daemon off;' >"$OUT/floor.log" 2>&1 &
FLOOR_PIDS=($!)

STEMEDB_URLS="http://127.0.0.1:18180,http://127.0.0.2:18180,http://127.0.0.3:18180"
FLOOR_URLS="http://127.0.0.1:18190,http://127.0.0.2:18190,http://127.0.0.3:18190"
ETCD_URLS="http://127.0.0.1:2379,http://127.0.0.2:2379,http://127.0.0.3:2379"
# A server that exits while starting (a port still held by an earlier run, a bad flag) fails
# the wait at once, naming its log, instead of the wait running out.
exited() {
  local pid
  for pid in "${STEMEDB_PIDS[@]}" "${ETCD_PIDS[@]}" "${FLOOR_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "$pid"; return 0; }
  done
  return 1
}
ready=0
for _ in $(seq 1 120); do
  if dead=$(exited); then
    echo "a server exited while starting (pid $dead); the last lines of the logs in $OUT:" >&2
    tail -n 5 "$OUT"/*.log >&2
    exit 1
  fi
  if curl -sf -o /dev/null http://127.0.0.1:18181/cluster/health \
    && curl -sf -o /dev/null http://127.0.0.2:18181/cluster/health \
    && curl -sf -o /dev/null http://127.0.0.3:18181/cluster/health \
    && etcdctl --endpoints="$ETCD_URLS" --command-timeout=2s endpoint health >/dev/null 2>&1 \
    && curl -sf -o /dev/null http://127.0.0.3:18190/; then
    ready=1; break
  fi
  sleep 0.5
done
[ "$ready" = 1 ] || { echo "the clusters (or the floor's nginx) did not come up in 60 s; logs in $OUT" >&2; exit 1; }
echo "both clusters healthy (StemeDB with $SHARDS shards) and the floor up; results in $OUT"
# Which etcd member leads (a follower forwards its writes to it), for the record.
etcdctl --endpoints="$ETCD_URLS" endpoint status 2>/dev/null \
  | awk -F', ' '$5 == "true" {print "etcd leader: " $1}' | tee "$OUT/etcd-leader.txt" || true

# CPU time (clock ticks, user + system) of processes and their children's threads: the
# servers' own work per operation, which on shared cores is what bounds throughput.
cpu_ticks() { # pid... -> ticks of those processes and of their child processes (nginx workers)
  local total=0 pid child ticks
  for pid in "$@"; do
    for child in "$pid" $(pgrep -P "$pid" || true); do
      # Fields 14 and 15 (utime, stime), counted after the command name's closing parenthesis.
      # A process that has just exited reads as nothing and counts 0.
      ticks=$(sed 's/.*) //' "/proc/$child/stat" 2>/dev/null | awk '{print $12 + $13}' || true)
      total=$((total + ${ticks:-0}))
    done
  done
  echo "$total"
}
# busy (user, nice, system, irq, softirq) and total ticks (those, idle, iowait and steal), as
# `stemedb bench` counts the total for its steal figure
machine_busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }

bench() { # system workload round -> $OUT/<system>-<workload>-<round>.json and .cpu
  local system=$1 workload=$2 round=$3 urls target writers readers spread pids before after busy_before busy_after
  local prefix=vs-etcd
  case "$system" in
    stemedb) urls=$STEMEDB_URLS; target=stemedb; pids=("${STEMEDB_PIDS[@]}") ;;
    floor) urls=$FLOOR_URLS; target=stemedb; pids=("${FLOOR_PIDS[@]}") ;;
    *) urls=$ETCD_URLS; target=etcd; pids=("${ETCD_PIDS[@]}") ;;
  esac
  # 64 clients keep to one node each (21-22 per node, on either system). The one client sends
  # its requests to the three nodes in turn, as etcd's Go client does (its balancer picks an
  # endpoint per request): kept to one node, its etcd figure would depend on whether that member
  # won the election (etcd forwards a follower's writes to its leader; StemeDB forwards those of
  # shards led elsewhere, 2 in 3 from any node).
  case "$workload" in
    write64) writers=64; readers=0; spread=connection ;;
    write1) writers=1; readers=0; spread=request ;;
    read64) writers=0; readers=64; spread=connection ;;
    read64fresh) writers=0; readers=64; spread=connection; prefix=vs-etcd-fresh ;;
  esac
  before=$(cpu_ticks "${pids[@]}")
  busy_before=$(machine_busy_ticks)
  "$BIN" bench --target "$target" --url "$urls" --writers "$writers" --readers "$readers" --spread "$spread" \
    --duration "$SECONDS_PER_RUN" --value-size 256 --keys 10000 --prefix "$prefix" --json \
    >"$OUT/$system-$workload-$round.json" 2>"$OUT/$system-$workload-$round.err"
  after=$(cpu_ticks "${pids[@]}")
  busy_after=$(machine_busy_ticks)
  # server ticks, machine busy ticks, machine total ticks, ticks per second
  echo "$((after - before)) $busy_before $busy_after $(getconf CLK_TCK)" \
    | awk '{print $1, $4 - $2, $5 - $3, $6}' >"$OUT/$system-$workload-$round.cpu"
}

# The read workloads read keys that exist: one preload of each key set per system.
for prefix in vs-etcd vs-etcd-fresh; do
  "$BIN" bench --target stemedb --url "$STEMEDB_URLS" --writers 1 --readers 0 --duration 1 \
    --value-size 256 --keys 10000 --prefix "$prefix" --preload --json >/dev/null
  "$BIN" bench --target etcd --url "$ETCD_URLS" --writers 1 --readers 0 --duration 1 \
    --value-size 256 --keys 10000 --prefix "$prefix" --preload --json >/dev/null
done

for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="stemedb etcd floor"; else order="floor etcd stemedb"; fi
  for workload in write64 write1 read64 read64fresh; do
    for system in $order; do
      echo "round $round: $workload on $system"
      bench "$system" "$workload" "$round"
    done
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
names = {"write64": "single writes, 64 clients", "write1": "single writes, 1 client", "read64": "linearizable reads, 64 clients",
         "read64fresh": "  same, keys written once"}
def cpu(system, workload, r, ops):
    # server CPU microseconds per operation, and the machine's busy share during the run
    server, busy, total, hz = (float(x) for x in open(f"{out}/{system}-{workload}-{r}.cpu").read().split())
    return (1e6 * server / hz / ops if ops else float("nan")), (100 * busy / total if total else float("nan"))
print(f"\n{'workload':<32} {'system':<8} {'round':>5} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p999 ms':>8} {'cpu us/op':>9} {'busy':>5}  errors")
summary = []
for workload, name in names.items():
    med = {}
    for system in ("stemedb", "etcd", "floor"):
        runs = []
        for r in range(1, rounds + 1):
            report = json.load(open(f"{out}/{system}-{workload}-{r}.json"))
            side = dict(report["results"][0])
            side["cpu_us_per_op"], side["busy_percent"] = cpu(system, workload, r, side["ops"])
            runs.append(side)
            print(f"{name:<32} {system:<8} {r:>5} {side['ops_per_sec']:>9.0f} {side['p50_ms']:>8.2f} {side['p99_ms']:>8.2f} {side['p999_ms']:>8.2f} {side['cpu_us_per_op']:>9.0f} {side['busy_percent']:>4.0f}%  {side['errors']}")
        med[system] = {k: statistics.median(s[k] for s in runs) for k in ("ops_per_sec", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_op")}
    summary.append((name, med))
print(f"\nmedians over {rounds} round(s)")
print(f"{'workload':<32} {'StemeDB ops/s':>13} {'p50':>7} {'p99':>7} {'etcd ops/s':>11} {'p50':>7} {'p99':>7} {'ratio':>6} {'floor ops/s':>12} {'p50':>7} {'p99':>7}")
for name, med in summary:
    s, e, f = med["stemedb"], med["etcd"], med["floor"]
    ratio = s["ops_per_sec"] / e["ops_per_sec"] if e["ops_per_sec"] else float("nan")
    print(f"{name:<32} {s['ops_per_sec']:>13.0f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {e['ops_per_sec']:>11.0f} {e['p50_ms']:>7.2f} {e['p99_ms']:>7.2f} {ratio:>5.2f}x {f['ops_per_sec']:>12.0f} {f['p50_ms']:>7.2f} {f['p99_ms']:>7.2f}")
print("\nserver CPU per operation (microseconds of user + system time of the three nodes, members or nginx; medians)")
print(f"{'workload':<32} {'StemeDB':>9} {'etcd':>9} {'floor':>9} {'StemeDB/etcd':>13}")
for name, med in summary:
    s, e, f = med["stemedb"], med["etcd"], med["floor"]
    cpu_ratio = s["cpu_us_per_op"] / e["cpu_us_per_op"] if e["cpu_us_per_op"] else float("nan")
    print(f"{name:<32} {s['cpu_us_per_op']:>9.0f} {e['cpu_us_per_op']:>9.0f} {f['cpu_us_per_op']:>9.0f} {cpu_ratio:>12.2f}x")
PY
