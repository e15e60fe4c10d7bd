#!/usr/bin/env python3
"""Every dashboard panel expression and every alert rule, evaluated by a real Prometheus scraping
a live 3-node cluster under load: each must return data (issue 18 §3).

The test starts a 3-node cluster of real `stemedb` processes on loopback (the cluster set-up of
scripts/run-runbooks.py, as scripts/lb-test.py uses it), Debian's `prometheus-node-exporter`
(meminfo, filesystem and diskstats collectors) and Debian's `prometheus`, both in the foreground
as children on free loopback ports, Prometheus with a scrape and evaluation interval of 1 s, the
jobs of dashboards/README.md (`stemedb`: the three nodes' /metrics; `node`: node_exporter) and
the shipped rule file dashboards/alerts/stemedb-alerts.yml in `rule_files`. Then:

1. load: LOAD_THREADS clients write (POST /v1/assert) and read (POST /v1/query, linearizable,
   several lenses) through all three nodes for LOAD_SECONDS; during it, an agent's circuit
   breaker is tripped and a claim quarantined (run-runbooks.py's scenario_breaker); after it,
   node 3 is killed until node 1 counts a failed peer RPC (stemedb_peer_rpc_errors_total, by
   peer and rpc, appears only then), restarted, and the cluster must be healthy again;
2. wait (bounded) until Prometheus reports every target up and holds enough samples of each
   node's series;
3. every rule group must be loaded with health "ok" and no lastError (GET /api/v1/rules);
4. every panel expression of every dashboard (expressions as scripts/lib/check_dashboards.py
   extracts them, `$instance` replaced by `.*`) and every alert rule expression is evaluated
   through GET /api/v1/query. An alert expression whose outermost operator is a comparison with
   a constant (`> 0`, `== 0`, `< 0.1`) is healthy when empty, so its left-hand side is evaluated
   instead (for `A and B`, each side);
5. each must return at least one series; a table of expressions and result counts is printed
   and the test exits 1 naming every dashboard panel or rule without data.

Adaptation (named in the output): a subquery's resolution `[1h:1m]` is evaluated as `[1h:1s]`:
`deriv` over a subquery needs two of its steps, i.e. two whole minutes of history at `:1m`,
which a short test does not have; the query is otherwise unchanged.

Usage: scripts/prometheus-live-test.py [--keep] [--seconds S] [--bin PATH] [--hosts a,b,c,d]
Binary: --bin, $STEMEDB_BIN, $CARGO_TARGET_DIR/release/stemedb, or ./target/release/stemedb.
Python 3 standard library, plus PyYAML (python3-yaml) for check_dashboards.
"""

import argparse
import http.client
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The cluster helpers of the runbook runner (Services, Cluster, pick_hosts, http, wait_until) and
# the expression extraction of the dashboards check.
rb = _load("run_runbooks", "scripts/run-runbooks.py")
cd = _load("check_dashboards", "scripts/lib/check_dashboards.py")
PORTS = rb.PORTS
RULE_FILE = os.path.join(ROOT, "dashboards", "alerts", "stemedb-alerts.yml")

LOAD_THREADS = 8
LOAD_SECONDS = 20.0
READY_TIMEOUT = 60.0  # targets up and enough samples after the load
MIN_SAMPLES = 5  # of up{job="stemedb"} per node, over the last minute
LENSES = ["recency", "authority", "consensus", "confidence", "all", "history"]  # Lens::NAMES
# Expression rewrites made for a short test (each printed when applied).
ADAPTATIONS = [(re.compile(r"\[(\w+):1m\]"), r"[\1:1s]",
                "subquery resolution :1m evaluated as :1s (deriv needs two steps: two minutes of history at :1m)")]
# Expressions allowed to return no data, with the reason. Empty: every expression must have data.
ALLOWED_NO_DATA = {}
# A result whose every value is NaN or ±Inf is no data on a panel too, and fails, except where
# the host explains it: (metric the query reads, PromQL that must return a series on this host
# for the exception to apply, reason).
ALLOWED_ALL_NAN = [
    ("node_memory_SwapTotal_bytes", "node_memory_SwapTotal_bytes == 0",
     "the host has no swap: SwapTotal is 0 and swap used / SwapTotal is 0/0 = NaN"),
]


def tool(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/usr/bin")


def free_port(ip):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Expressions


COMPARISON_RE = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*(?:bool\s+)?([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def top_level(expr, ops):
    """Positions (index, op) of the operators `ops` (words or symbols) outside parentheses,
    brackets, braces and strings in expr."""
    found, depth, i, quote = [], 0, 0, None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for op in ops:
                if op.isalpha():
                    if (expr.startswith(op, i) and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] == "_"))
                            and (i + len(op) >= len(expr) or not (expr[i + len(op)].isalnum() or expr[i + len(op)] == "_"))):
                        found.append((i, op))
                        break
                elif expr.startswith(op, i):
                    found.append((i, op))
                    i += len(op) - 1
                    break
        i += 1
    return found


def strip_comparison(expr):
    """The left-hand side of `LHS <op> <number>` when the comparison is outermost, else None."""
    m = COMPARISON_RE.search(expr)
    if not m:
        return None
    lhs = expr[:m.start()]
    # The comparison must be outermost: no other top-level comparison or set operator follows
    # its left-hand side's last top-level binary operator of lower precedence.
    if top_level(lhs, ["and", "or", "unless"]) or top_level(lhs, [">=", "<=", "==", "!=", ">", "<"]):
        return None
    return lhs.strip()


def rule_queries(expr):
    """[(what, query)] to evaluate for an alert expression: its left-hand side(s) when it ends
    in a comparison with a constant, else the expression itself."""
    expr = " ".join(expr.split())
    sides = top_level(expr, ["and", "unless"])
    if sides and not top_level(expr, ["or"]):
        parts, start = [], 0
        for pos, op in sides:
            parts.append(expr[start:pos].strip())
            start = pos + len(op)
        parts.append(expr[start:].strip())
        out = []
        for n, part in enumerate(parts):
            lhs = strip_comparison(part)
            out.append((f"side {n + 1} lhs" if lhs else f"side {n + 1}", lhs or part))
        return out
    lhs = strip_comparison(expr)
    return [("lhs", lhs)] if lhs else [("expr", expr)]


def adapt(query):
    notes = []
    for pattern, repl, note in ADAPTATIONS:
        query, n = pattern.subn(repl, query)
        if n:
            notes.append(note)
    return query, notes


def expressions():
    """[(kind, where, original, query, notes)] for every panel target and every alert rule."""
    out = []
    for base, panel, target, expr in cd.panel_expressions(ROOT):
        where = f"{base} panel {panel.get('id')} {panel.get('title')!r} {target.get('refId')}"
        query, notes = adapt(" ".join(expr.split()))
        out.append(("panel", where, expr, query, notes))
    for base, group, rule, name in cd.rule_expressions(ROOT):
        for what, q in rule_queries(rule["expr"]):
            query, notes = adapt(q)
            out.append(("rule", f"{base} {group}/{name} ({what})", rule["expr"], query, notes))
    return out


# ---------------------------------------------------------------------------------------------
# Processes


class Child:
    def __init__(self, name, argv, log, cwd):
        self.name = name
        self.log = log
        with open(log, "a") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL, cwd=cwd,
                                         start_new_session=True)

    def check(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {rb.tail(self.log)}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def prom_get(base, path, params=None, timeout=10):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    status, body = rb.http("GET", url, timeout=timeout)
    return status, body


def wait_answers(child, ip, port, path, timeout=30):
    """Until the child answers 200 on GET path (fails at once if it exited)."""
    def ready():
        child.check()
        try:
            c = http.client.HTTPConnection(ip, port, timeout=2)
            c.request("GET", path)
            ok = c.getresponse().status == 200
            c.close()
            return ok, None
        except OSError as e:
            return False, repr(e)
    rb.wait_until(f"{child.name} to answer GET {path}", ready, timeout, 0.2)


def start_prometheus(d, ip, ips, exporter):
    port = free_port(ip)
    config = os.path.join(d, "prometheus.yml")
    targets = ", ".join(f"'{h}:{PORTS['api']}'" for h in ips[:3])
    with open(config, "w") as f:
        f.write(f"""# prometheus-live-test.py: the jobs of dashboards/README.md, 1 s intervals.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s

rule_files:
  - {RULE_FILE}

scrape_configs:
  - job_name: stemedb
    metrics_path: /metrics
    static_configs:
      - targets: [{targets}]
  - job_name: node
    static_configs:
      - targets: ['{exporter}']
""")
    r = subprocess.run([tool("promtool"), "check", "config", config], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"promtool check config: {r.stdout}{r.stderr}")
    storage = os.path.join(d, "data")
    os.makedirs(storage)
    child = Child("prometheus", [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={storage}",
                                 f"--web.listen-address={ip}:{port}", "--storage.tsdb.retention.time=1d",
                                 "--log.level=warn"], os.path.join(d, "prometheus.log"), d)
    wait_answers(child, ip, port, "/-/ready")
    return child, f"http://{ip}:{port}"


def start_node_exporter(d, ip):
    port = free_port(ip)
    child = Child("prometheus-node-exporter",
                  [tool("prometheus-node-exporter"), f"--web.listen-address={ip}:{port}",
                   "--collector.disable-defaults", "--collector.meminfo", "--collector.filesystem",
                   "--collector.diskstats"], os.path.join(d, "node-exporter.log"), d)
    wait_answers(child, ip, port, "/metrics")
    return child, f"{ip}:{port}"


# ---------------------------------------------------------------------------------------------
# Load


class Load:
    def __init__(self, ips):
        self.ips = ips[:3]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = {}

    def count(self, key):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def worker(self, t):
        conns = {}
        i = 0
        while not self.stop.is_set():
            ip = self.ips[(t + i) % 3]
            path = f"load/t{t}/c{i % 16}"
            if i % 2 == 0:
                op, url = "write", "/v1/assert"
                body = {"concept_path": path, "predicate": "v", "value": i, "agent_id": f"loader{t % 4}",
                        "request_id": f"prom-{t}-{i}"}
            else:
                op, url = "read", "/v1/query"
                body = {"concept_path": path, "lens": LENSES[(i // 2) % len(LENSES)]}
                if i % 3 == 0:
                    body["consistency"] = "stale"
            try:
                c = conns.get(ip) or http.client.HTTPConnection(ip, PORTS["api"], timeout=10)
                conns[ip] = c
                c.request("POST", url, json.dumps(body), {"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                self.count(f"{op} {r.status}")
            except (OSError, http.client.HTTPException) as e:
                conns.pop(ip, None)
                self.count(f"{op} {type(e).__name__}")
                time.sleep(0.05)
            i += 1
        for c in conns.values():
            c.close()


# ---------------------------------------------------------------------------------------------
# The test


def wait_scraped(base, ips, exporter):
    want = {f"{h}:{PORTS['api']}" for h in ips[:3]} | {exporter}

    def check():
        status, body = prom_get(base, "/api/v1/targets")
        if status != 200:
            return False, status
        up = {t["labels"]["instance"] for t in body["data"]["activeTargets"] if t["health"] == "up"}
        if not want <= up:
            return False, f"targets up: {sorted(up)}"
        status, body = prom_get(base, "/api/v1/query", {"query": 'count_over_time(up{job="stemedb"}[1m])'})
        counts = [float(r["value"][1]) for r in body["data"]["result"]]
        if not (len(counts) == 3 and min(counts) >= MIN_SAMPLES):
            return False, f"samples per node: {counts}"
        # The series the last event created (the peer outage) need two samples for rate().
        status, body = prom_get(base, "/api/v1/query", {"query": "count_over_time(stemedb_peer_rpc_errors_total[1m]) >= 2"})
        return bool(body["data"]["result"]), "stemedb_peer_rpc_errors_total: fewer than 2 samples"
    return rb.wait_until("every target up with enough samples", check, READY_TIMEOUT, 0.5)


def check_rules_loaded(base):
    status, body = prom_get(base, "/api/v1/rules")
    if status != 200:
        return [f"GET /api/v1/rules: {status}"], 0, 0
    with open(RULE_FILE) as f:
        import yaml
        shipped = yaml.safe_load(f)
    want = {g["name"]: len(g["rules"]) for g in shipped["groups"]}
    problems, rules = [], 0
    groups = {g["name"]: g for g in body["data"]["groups"]}
    for name, n in want.items():
        g = groups.get(name)
        if g is None:
            problems.append(f"rule group {name} not loaded")
            continue
        if len(g["rules"]) != n:
            problems.append(f"rule group {name}: {len(g['rules'])} rules loaded, the file has {n}")
        for r in g["rules"]:
            rules += 1
            if r.get("health") != "ok" or r.get("lastError"):
                problems.append(f"rule {name}/{r['name']}: health {r.get('health')!r} {r.get('lastError', '')}")
    return problems, len(groups), rules


def evaluate(base, exprs):
    rows = []
    for kind, where, original, query, notes in exprs:
        status, body = prom_get(base, "/api/v1/query", {"query": query})
        if status != 200 or body.get("status") != "success":
            rows.append((kind, where, query, None, f"error {status}: {body and body.get('error')}", notes))
            continue
        data = body["data"]
        result = data["result"]
        if data["resultType"] == "scalar":
            result = [{"value": result}]
        values = [r["value"][1] for r in result] if data["resultType"] in ("vector", "scalar") else []
        nan = sum(1 for v in values if v in ("NaN", "+Inf", "-Inf"))
        note = f"{nan} NaN/Inf" if nan else ""
        count = len(result)
        if result and nan == len(result):
            reason = None
            for metric, condition, why in ALLOWED_ALL_NAN:
                if metric in query:
                    st, b = prom_get(base, "/api/v1/query", {"query": condition})
                    if st == 200 and b["data"]["result"]:
                        reason = why
            if reason:
                note += f"; allowed: {reason}"
            else:
                note += "; every value NaN/Inf: no data"
                count = 0
        rows.append((kind, where, query, count, note, notes))
    return rows


def peer_rpc_errors(ip):
    """The sum of stemedb_peer_rpc_errors_total on a node's /metrics (0 before the first)."""
    c = http.client.HTTPConnection(ip, PORTS["api"], timeout=5)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    return sum(float(v) for v in re.findall(r"^stemedb_peer_rpc_errors_total\{[^}]*\}\s+(\S+)", text, re.M))


def peer_outage(cluster):
    """stemedb_peer_rpc_errors_total (labelled by peer and rpc) appears with the first failed
    peer RPC only: node 3 is killed until node 1 counts one, then restarted, and the cluster
    must be healthy again."""
    victim = cluster.ips[2]
    t0 = time.monotonic()
    cluster.services.stop(victim, sig=signal.SIGKILL)
    rb.wait_until("a failed peer RPC on node 1", lambda: (peer_rpc_errors(cluster.ips[0]) > 0, None), 30, 0.2)
    down = time.monotonic() - t0
    cluster.services.start(victim)
    cluster.start()  # waits until the cluster is healthy with all three nodes
    return (f"node 3 killed for {down:.1f} s (until node 1 had counted a failed peer RPC), restarted; "
            f"cluster healthy {time.monotonic() - t0:.1f} s after the kill")


def run(args, binary, root):
    ips = rb.pick_hosts(args.hosts.split(",") if args.hosts else None)
    print(f"prometheus-live-test: cluster on {', '.join(ips[:3])}, binary {binary}", flush=True)
    services = rb.Services(root, binary)
    cluster = rb.Cluster(root, binary, ips, services)
    children = []
    try:
        cluster.prepare()
        cluster.start()
        exporter_child, exporter = start_node_exporter(root, ips[0])
        children.append(exporter_child)
        prom, base = start_prometheus(root, ips[0], ips, exporter)
        children.append(prom)
        print(f"prometheus-live-test: prometheus at {base}, node_exporter at {exporter}", flush=True)

        cluster.seed()
        load = Load(ips)
        threads = [threading.Thread(target=load.worker, args=(t,), daemon=True) for t in range(LOAD_THREADS)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        time.sleep(min(3.0, args.seconds / 4))
        events = rb.scenario_breaker(cluster)
        print(f"prometheus-live-test: {events}", flush=True)
        time.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
        load.stop.set()
        for th in threads:
            th.join(20)
        print(f"prometheus-live-test: load {time.monotonic() - t0:.1f} s, {LOAD_THREADS} threads: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(load.counts.items())), flush=True)
        print(f"prometheus-live-test: {peer_outage(cluster)}", flush=True)
        for c in children:
            c.check()
        wait_scraped(base, ips, exporter)

        rule_problems, groups, rules = check_rules_loaded(base)
        exprs = expressions()
        rows = evaluate(base, exprs)
        return rows, rule_problems, groups, rules
    finally:
        for c in reversed(children):
            c.stop()
        services.stop_all()
        cluster.unmount_all()


def report(rows, rule_problems, groups, rules):
    failures = list(rule_problems)
    print()
    print(f"{'kind':5}  {'series':>6}  where / query")
    adapted = set()
    for kind, where, query, count, note, notes in rows:
        shown = "ERR" if count is None else str(count)
        print(f"{kind:5}  {shown:>6}  {where}{'  [' + note + ']' if note else ''}")
        print(f"{'':15}{query}")
        adapted.update(notes)
        if count is None:
            failures.append(f"{where}: {note}: {query}")
        elif count == 0:
            reason = ALLOWED_NO_DATA.get(query)
            if reason:
                print(f"{'':15}allowed without data: {reason}")
            else:
                failures.append(f"{where}: no data: {query}")
    for note in sorted(adapted):
        print(f"adaptation: {note}")
    panels = [r for r in rows if r[0] == "panel"]
    rule_rows = [r for r in rows if r[0] == "rule"]
    with_data = lambda rs: sum(1 for r in rs if r[3])
    print(f"\nprometheus-live-test: {groups} rule groups, {rules} rules loaded"
          f"{' ok' if not rule_problems else ''}; {len(panels)} panel expressions, {with_data(panels)} with data; "
          f"{len(rule_rows)} rule expressions evaluated, {with_data(rule_rows)} with data")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs)")
    parser.add_argument("--seconds", type=float, default=LOAD_SECONDS, help="load duration")
    parser.add_argument("--bin", help="the stemedb binary")
    parser.add_argument("--hosts", help="four loopback addresses, comma separated (as run-runbooks.py)")
    args = parser.parse_args()
    for name in ("prometheus", "promtool", "prometheus-node-exporter"):
        if not tool(name):
            print(f"prometheus-live-test: {name} is not installed (scripts/setup.sh installs it)", file=sys.stderr)
            return 1
    binary = rb.find_binary(args.bin)
    root = tempfile.mkdtemp(prefix="prometheus-live-test.")
    os.chmod(root, 0o755)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt  # unwinds through run's `finally`, which stops every child

    signal.signal(signal.SIGTERM, on_signal)
    try:
        shutil.copy2(binary, os.path.join(root, "stemedb"))
        rows, rule_problems, groups, rules = run(args, os.path.join(root, "stemedb"), root)
        rc = report(rows, rule_problems, groups, rules)
    except KeyboardInterrupt:
        print("prometheus-live-test: interrupted", file=sys.stderr)
        rc = 130
    except Exception as e:
        print(f"prometheus-live-test: FAILED: {e}", file=sys.stderr)
        rc = 1
    finally:
        if args.keep:
            print(f"prometheus-live-test: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("prometheus-live-test: " + ("ok" if rc == 0 else "FAILED"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
