#!/usr/bin/env python3
"""Backup benchmark (issue 17, docs/performance.md "Backups"): a 3-node cluster (16 shards,
fsync on) on 127.0.0.1-3 of this machine holding ASSERTIONS assertions, then:

  1. once no node has appended to its Raft log for 2 s (backups read at the idle pace), one full
     backup to a directory, one to moto's S3 server on loopback, and an incremental one after
     1,000 more assertions (the store already holds the first: only changed files are uploaded);
  2. `stemedb backup verify` of the directory backup;
  3. write latency without a backup: `stemedb bench`, 16 writers of single assertions, SECONDS s,
     and the same while backups to fresh directories run back to back (each a full backup, at
     the busy pace); ROUNDS rounds of both, alternating which goes first, reported as medians;
  4. the RTO of a restore: the three nodes killed, three data dirs restored from the directory
     backup (in parallel, as on three machines) and started, until a linearizable read answers.

Prints one JSON line per measurement and a table. Reports only: nothing here asserts a timing.

Usage: scripts/backup-bench.py [--assertions N] [--seconds S] [--rounds R] [--keep] [--during-to DIR|s3] [--archive-interval-ms MS]
Binary: --bin, $STEMEDB_BIN, $CARGO_TARGET_DIR/release/stemedb, or ./target/release/stemedb.
Needs moto's virtualenv (scripts/setup.sh). Python 3 standard library only.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
API, ADMIN, RAFT = 28180, 28181, 28182
SHARDS = 16
MOTO_PORT = 28190


def binary(explicit):
    for candidate in [explicit, os.environ.get("STEMEDB_BIN"),
                      os.path.join(os.environ.get("CARGO_TARGET_DIR", ""), "release", "stemedb") if os.environ.get("CARGO_TARGET_DIR") else None,
                      os.path.join(ROOT, "target", "release", "stemedb")]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    sys.exit("no stemedb binary: build it or set STEMEDB_BIN")


def http(method, url, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def wait(what, check, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


class Cluster:
    def __init__(self, bin_path, work, env):
        self.bin, self.work, self.env, self.procs = bin_path, work, env, {}
        self.initial = ",".join(f"{i + 1}={ip}:{RAFT}" for i, ip in enumerate(IPS))

    def data_dir(self, i, name="data"):
        return os.path.join(self.work, f"n{i + 1}", name)

    def start(self, name="data"):
        for i, ip in enumerate(IPS):
            log = open(os.path.join(self.work, f"n{i + 1}-{name}.log"), "a")
            self.procs[i] = subprocess.Popen(
                [self.bin, "serve", "--node-id", str(i + 1), "--data-dir", self.data_dir(i, name),
                 "--api-addr", f"{ip}:{API}", "--admin-addr", f"{ip}:{ADMIN}", "--raft-addr", f"{ip}:{RAFT}",
                 "--initial-cluster", self.initial], stdout=log, stderr=log, env=self.env)

    def kill(self):
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
        self.procs = {}

    def serving(self):
        status, _ = http("POST", f"http://{IPS[0]}:{API}/v1/query", {"concept_path": "bench/probe", "consistency": "linearizable"}, timeout=2)
        return status == 200

    def healthy(self):
        """The cluster reports healthy and every node's client API answers (the load goes to all three)."""
        status, body = http("GET", f"http://{IPS[0]}:{ADMIN}/cluster/health", timeout=2)
        if not (status == 200 and body and body.get("status") == "healthy"):
            return False
        return all(http("GET", f"http://{ip}:{API}/health", timeout=2)[0] == 200 for ip in IPS)


def log_appends():
    """Each node's count of group-committed Raft log appends (the fsync counter)."""
    counts = []
    for ip in IPS:
        try:
            with urllib.request.urlopen(f"http://{ip}:{API}/metrics", timeout=5) as response:
                text = response.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        count = next((line.split()[-1] for line in text.splitlines()
                      if line.startswith('stemedb_storage_operations_total{operation="fsync"}')), None)
        if count is None:
            return None
        counts.append(count)
    return counts


def quiet(seconds=2.0, timeout=60):
    """Waits until no node appended to its Raft log for SECONDS (the writes and the anti-entropy
    checks after them are over), so that a measured backup runs at the idle read pace."""
    deadline = time.time() + timeout
    last, since = log_appends(), time.time()
    while time.time() < deadline:
        time.sleep(0.2)
        now = log_appends()
        if now is None or now != last:
            last, since = now, time.time()
        elif time.time() - since >= seconds:
            return
    print("the cluster did not go quiet; the backups below may have run at the busy pace", file=sys.stderr)


def load(assertions):
    """ASSERTIONS assertions in batches of 1000, 4 at a time, spread over the nodes."""
    batches = (assertions + 999) // 1000
    errors = []

    def send(b):
        items = [{"concept_path": f"bench/c{(b * 1000 + j) % 20000}", "predicate": "p", "value": "x" * 200,
                  "agent_id": f"loader-{j % 50}"} for j in range(min(1000, assertions - b * 1000))]
        status, body = http("POST", f"http://{IPS[b % 3]}:{API}/v1/assert/batch", {"assertions": items}, timeout=120)
        if status not in (200, 201):
            errors.append((status, body))

    threads = []
    for b in range(batches):
        t = threading.Thread(target=send, args=(b,))
        t.start()
        threads.append(t)
        if len(threads) >= 4:
            threads.pop(0).join()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"loading failed: {errors[:3]}")


def bench(bin_path, seconds):
    out = subprocess.run([bin_path, "bench", "--url", ",".join(f"http://{ip}:{API}" for ip in IPS), "--writers", "16",
                          "--duration", str(seconds), "--value-size", "200", "--json"], capture_output=True, text=True, check=True)
    write = json.loads(out.stdout)["results"][0]
    return {k: write[k] for k in ("ops_per_sec", "p50_ms", "p99_ms", "p999_ms")}


def backup(bin_path, dest, env):
    started = time.time()
    out = subprocess.run([bin_path, "backup", "create", "--to", dest, "--node", f"http://{IPS[0]}:{API}", "--json"],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"backup to {dest} failed: {out.stdout} {out.stderr}")
    progress = json.loads(out.stdout)
    return {"seconds": (progress["finished_at_us"] - progress["started_at_us"]) / 1e6, "wall_seconds": time.time() - started,
            "files_uploaded": progress["files_uploaded"], "bytes_uploaded": progress["bytes_uploaded"],
            "files_reused": progress["files_reused"], "bytes_read": progress["bytes_read"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--assertions", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of writes alone and during backups (medians)")
    parser.add_argument("--bin")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--during-to", help="where the back-to-back backups of step 3 go: a directory (default: the "
                        "work dir, on the nodes' disk; a tmpfs such as /dev/shm separates the disk's share from the "
                        "CPU's), or 's3' for moto's S3 server on loopback")
    parser.add_argument("--archive-interval-ms", type=int, help="run the nodes with continuous log archival "
                        "(backup.archive_enabled) at this interval, into a directory of the run; compare with a run "
                        "without for its cost to writes")
    args = parser.parse_args()
    bin_path = binary(args.bin)
    venv = os.environ.get("MOTO_VENV", os.path.expanduser("~/.cache/stemedb-venv"))
    work = tempfile.mkdtemp(prefix="backup-bench.")
    env = dict(os.environ, STEMEDB_CLUSTER_SHARDS=str(SHARDS), STEMEDB_CIRCUIT_BREAKER_MAX_WRITES_PER_SEC="10000000",
               AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", STEMEDB_BACKUP_S3_ENDPOINT=f"http://127.0.0.1:{MOTO_PORT}",
               STEMEDB_BACKUP_S3_REGION="us-east-1", STEMEDB_BACKUP_S3_ALLOW_HTTP="true")
    env.pop("STEMEDB_BIN", None)
    if args.archive_interval_ms:
        archive = os.path.join(work, "archive-store")
        os.makedirs(archive)
        env.update(STEMEDB_BACKUP_DESTINATION=archive, STEMEDB_BACKUP_ARCHIVE_ENABLED="true",
                   STEMEDB_BACKUP_ARCHIVE_INTERVAL_MS=str(args.archive_interval_ms))
    moto = subprocess.Popen([os.path.join(venv, "bin", "moto_server"), "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster = Cluster(bin_path, work, env)
    results = {}
    try:
        wait("moto", lambda: http("PUT", f"http://127.0.0.1:{MOTO_PORT}/bench")[0] == 200, 60)
        cluster.start()
        wait("the cluster", cluster.healthy)
        started = time.time()
        load(args.assertions)
        results["load"] = {"assertions": args.assertions, "seconds": round(time.time() - started, 1)}
        print(json.dumps({"load": results["load"]}), flush=True)

        quiet()
        results["backup_dir"] = backup(bin_path, os.path.join(work, "store"), env)
        print(json.dumps({"backup_dir": results["backup_dir"]}), flush=True)
        results["backup_s3"] = backup(bin_path, "s3://bench/cluster", env)
        print(json.dumps({"backup_s3": results["backup_s3"]}), flush=True)
        # 1,000 new assertions, then a backup into the same store: only changed files go up.
        load(1000)
        quiet()
        results["backup_dir_incremental"] = backup(bin_path, os.path.join(work, "store"), env)
        print(json.dumps({"backup_dir_incremental": results["backup_dir_incremental"]}), flush=True)

        started = time.time()
        out = subprocess.run([bin_path, "backup", "verify", "--from", os.path.join(work, "store"), "--json"],
                             capture_output=True, text=True, env=env)
        verified = json.loads(out.stdout)
        results["verify"] = {"seconds": round(time.time() - started, 2), "ok": verified["ok"], "files": verified["files"],
                             "bytes": verified["bytes"], "records": verified["records"]}
        print(json.dumps({"verify": results["verify"]}), flush=True)

        # Writes alone and while full backups (each to a fresh directory) run back to back,
        # alternating which goes first in each round: every run adds claims to the same keys, so a
        # fixed order would give the later run a larger store.
        runs = {"alone": [], "during": []}

        def during_backups():
            stop = threading.Event()
            done, failed = [], []

            def backups():
                n = 0
                while not stop.is_set() and not failed:
                    if args.during_to == "s3":
                        target = f"s3://bench/during-{n}"
                    else:
                        target = os.path.join(args.during_to or work, f"backup-bench-during-{n}")
                    try:
                        done.append(backup(bin_path, target, env)["seconds"])
                    except SystemExit as error:
                        failed.append(str(error))
                    if args.during_to != "s3":
                        shutil.rmtree(target, ignore_errors=True)
                    n += 1

            t = threading.Thread(target=backups)
            t.start()
            run = bench(bin_path, args.seconds)
            stop.set()
            t.join()
            if failed:
                sys.exit(f"a backup during the writes failed: {failed[0]}")
            run["backups_run"] = len(done)
            run["backup_seconds"] = [round(x, 2) for x in done]
            return run

        for r in range(args.rounds):
            for kind in (["alone", "during"] if r % 2 == 0 else ["during", "alone"]):
                run = bench(bin_path, args.seconds) if kind == "alone" else during_backups()
                run["round"] = r + 1
                runs[kind].append(run)
                print(json.dumps({f"writes_{kind}" if kind == "alone" else "writes_during_backups": run}), flush=True)

        def median_run(kind):
            keys = ("ops_per_sec", "p50_ms", "p99_ms", "p999_ms")
            merged = {k: statistics.median(run[k] for run in runs[kind]) for k in keys}
            if kind == "during":
                merged["backups_run"] = sum(run["backups_run"] for run in runs[kind])
                merged["backup_seconds"] = [x for run in runs[kind] for x in run["backup_seconds"]]
            return merged

        results["writes_alone"] = median_run("alone")
        results["writes_during_backups"] = median_run("during")

        # RTO: the cluster destroyed, three data dirs restored in parallel, started, serving.
        cluster.kill()
        destroyed = time.time()
        restores = [subprocess.Popen([bin_path, "backup", "restore", "--from", os.path.join(work, "store"), "--json",
                                      "--node-id", str(i + 1), "--data-dir", cluster.data_dir(i, "restored"),
                                      "--initial-cluster", cluster.initial], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                    for i in range(3)]
        for r in restores:
            if r.wait() != 0:
                sys.exit(f"restore failed: {r.stderr.read().decode()}")
        restored = time.time()
        cluster.start("restored")
        wait("the restored cluster", cluster.serving)
        results["restore"] = {"restore_seconds": round(restored - destroyed, 2), "rto_seconds": round(time.time() - destroyed, 2)}
        print(json.dumps({"restore": results["restore"]}), flush=True)
    finally:
        cluster.kill()
        moto.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    alone, during = results["writes_alone"], results["writes_during_backups"]
    print()
    print(f"{'measurement':<40} {'value':>14}")
    print(f"{'assertions':<40} {args.assertions:>14,}")
    for name, key in [("backup to a directory (s)", "backup_dir"), ("backup to S3 on loopback (s)", "backup_s3"),
                      ("incremental backup, 1,000 new (s)", "backup_dir_incremental")]:
        print(f"{name:<40} {results[key]['seconds']:>14.2f}")
    print(f"{'verify (s)':<40} {results['verify']['seconds']:>14.2f}")
    print(f"{'restore of 3 data dirs (s)':<40} {results['restore']['restore_seconds']:>14.2f}")
    print(f"{'RTO: destroyed to serving (s)':<40} {results['restore']['rto_seconds']:>14.2f}")
    print(f"{'writes/s alone, during backups':<40} {alone['ops_per_sec']:>6.0f} {during['ops_per_sec']:>7.0f}")
    print(f"{'write p50 ms alone, during':<40} {alone['p50_ms']:>6.1f} {during['p50_ms']:>7.1f}")
    print(f"{'write p99 ms alone, during':<40} {alone['p99_ms']:>6.1f} {during['p99_ms']:>7.1f}")
    print(f"{'write p999 ms alone, during':<40} {alone['p999_ms']:>6.1f} {during['p999_ms']:>7.1f}")
    print(f"{'backups during the runs':<40} {during['backups_run']:>14}")
    under_writes = during["backup_seconds"]
    # The first backup of a run starts before its writes and the last ends after them.
    print(f"{'backup under writes (s), median':<40} {statistics.median(under_writes) if under_writes else float('nan'):>14.2f}")
    print(f"(writes: medians of {args.rounds} rounds of {args.seconds} s each; p99 during/alone: "
          f"{during['p99_ms'] / alone['p99_ms'] - 1:+.0%})")


if __name__ == "__main__":
    main()
