#!/usr/bin/env python3
"""The shipped load-balancer configs in front of a live 3-node cluster, through a node kill.

For each balancer (nginx, then HAProxy) the test starts a fresh 3-node cluster of real `stemedb`
processes on loopback (the cluster set-up of scripts/run-runbooks.py: 127.0.0.1-3, or the first
free 127.0.N.1-3), renders the shipped config (deploy/nginx/stemedb.conf,
deploy/haproxy/haproxy.cfg) with only the node addresses, the listen address and the pid, log
and temp paths substituted, checks it (`nginx -t`, `haproxy -c`) and runs the balancer in the
foreground as a child. First the web dashboard must answer at /dashboard/ through the balancer
(its page, /dashboard/session, and the node's APIs under it). Then LOAD_THREADS clients write (POST /v1/assert, a unique request_id
each) and read (POST /v1/query of the path just written) through the balancer for LOAD_SECONDS;
node 3 is killed with SIGKILL KILL_AT seconds in and restarted (same data dir and config)
RESTART_AT seconds in. Afterwards every acknowledged write (201) is read back through the
balancer (GET /v1/assertions/{id}), and the restarted node's own /metrics must show it answered
queries again (`stemedb_query_total`, counted since its restart, so any value above 0 is traffic
the balancer sent it).

The rule for failed requests, from the configs' comments ("Retries"): both balancers resend a
request to another node only when the connection failed before the request was sent; a request
that may have reached a node is answered as that node answered, never sent twice. So the only
failures allowed are requests IN FLIGHT ON THE KILLED NODE'S ACCOUNT AT THE KILL: requests that
started before the kill and ended after it, answered
  - 502 by the balancer, as many as its log puts on a connection to the killed node that broke
    after the request was sent (nginx's error.log; HAProxy's httplog `SH`/`SD` lines), or, with
    HAProxy, a client connection closed without a response while the request was in flight at
    the kill or started within KILL_NOTICE of it (HAProxy's keep-alive behaviour when a server
    drops a reused connection under a request that is not the first of its client connection:
    it neither answers nor logs; a pooled connection the kill closed can still be picked until
    HAProxy's event loop sees it close), or
  - by a node with an indeterminate-outcome error: 504 `outcome_unknown` / `timeout`, or
    503 `leader_unreachable` (a forwarded write whose connection to the killed leader broke).
A node's own "retry" answer (503 no_quorum, leader_unreachable, not_leader, 504 timeout,
outcome_unknown) to a request sent after the kill is passed through by both configs (a POST is
never resent once sent); it is allowed from the kill until SETTLE_SECONDS after the cluster is
healthy again (the restarted node takes back its preferred shards then), counted apart.
Any other failure, any failure outside those windows, and any other connection error to the
balancer itself fails the test, as does a restarted node that gets no traffic
within BACK_TIMEOUT seconds of its restart, or an acknowledged write that cannot be read back.

Usage: scripts/lb-test.py [--only nginx|haproxy] [--keep] [--seconds S]
Binary: --bin, $STEMEDB_BIN, $CARGO_TARGET_DIR/release/stemedb, or ./target/release/stemedb.
Python 3 standard library only.
"""

import argparse
import concurrent.futures
import http.client
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The cluster helpers of the runbook runner (Services, Cluster, pick_hosts, http, wait_until).
_spec = importlib.util.spec_from_file_location("run_runbooks", os.path.join(ROOT, "scripts", "run-runbooks.py"))
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)
PORTS = rb.PORTS

LOAD_THREADS = 16
LOAD_SECONDS = 20.0
KILL_AT = 5.0
RESTART_AT = 10.0
BACK_TIMEOUT = 30.0
CLIENT_TIMEOUT = 40.0  # above both configs' 35 s server timeouts
# Node answers (with an error body) that say "retry" during a failover, which neither config
# resends for a POST once it reached a node; allowed from the kill until SETTLE_SECONDS after the
# cluster is healthy again with the restarted node (its shards' leadership moves back to it then).
NODE_RETRYABLE = {"no_quorum", "leader_unreachable", "not_leader", "timeout", "outcome_unknown"}
SETTLE_SECONDS = 10.0
KILL_NOTICE = 0.5  # how long after the kill the balancer may still send on a dropped connection
ALLOWED_IN_FLIGHT = {(504, "outcome_unknown"), (504, "timeout"), (503, "leader_unreachable")}


def tool(name):
    """nginx and haproxy live in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def free_port(ip):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The balancers: render the shipped config, check it, run it in the foreground.


def substitute_nodes(text, ips):
    for i, ip in enumerate(ips[:3]):
        for port in (PORTS["api"], PORTS["dashboard"]):
            text, n = re.subn(rf"\b10\.0\.0\.{i + 1}:{port}\b", f"{ip}:{port}", text)
            if n != 1:
                raise RuntimeError(f"expected one address 10.0.0.{i + 1}:{port} in the shipped config, found {n}")
    return text


def check_dashboard(balancer):
    """The dashboard through the balancer at /dashboard/: its page, the node it reached, and that
    node's cluster admin and client API under it; /dashboard redirects there."""
    c = http.client.HTTPConnection(balancer.ip, balancer.port, timeout=10)
    try:
        c.request("GET", "/dashboard")
        r = c.getresponse()
        r.read()
        if r.status != 301 or not r.getheader("Location", "").endswith("/dashboard/"):
            raise RuntimeError(f"GET /dashboard through {balancer.kind}: {r.status} to {r.getheader('Location')}")
        c.request("GET", "/dashboard/")
        r = c.getresponse()
        page = r.read().decode(errors="replace")
        if r.status != 200 or "<title>StemeDB</title>" not in page:
            raise RuntimeError(f"GET /dashboard/ through {balancer.kind}: {r.status} {page[:200]}")
    finally:
        c.close()
    status, session = request("GET", balancer.ip, balancer.port, "/dashboard/session", timeout=10)
    status_health, health = request("GET", balancer.ip, balancer.port, "/dashboard/cluster-api/cluster/health", timeout=10)
    status_query, _ = request("POST", balancer.ip, balancer.port, "/dashboard/api/v1/query", {"concept_path": "lb/probe"}, timeout=10)
    if status != 200 or status_health != 200 or health.get("status") != "healthy" or status_query != 200:
        raise RuntimeError(f"the dashboard's APIs through {balancer.kind}: session {status} {session}, "
                           f"health {status_health} {health}, query {status_query}")
    return session["node_id"]


def render_shipped(rel, d, ips, listen_re, listen):
    """The shipped config at `rel` with the node addresses and the listen address (the one line
    matching `listen_re`, its directive kept) substituted, written into d; (path, text)."""
    with open(os.path.join(ROOT, rel)) as f:
        text = substitute_nodes(f.read(), ips)
    text, n = re.subn(listen_re, lambda m: f"{m.group(1)}{listen}{m.group(2)}", text, flags=re.M)
    if n != 1:
        raise RuntimeError(f"expected one listen line matching {listen_re!r} in {rel}")
    path = os.path.join(d, os.path.basename(rel))
    with open(path, "w") as f:
        f.write(text)
    return path, text


def render_nginx(d, ips, listen):
    site, _ = render_shipped("deploy/nginx/stemedb.conf", d, ips, r"^(\s*listen )80(;)", listen)
    temps = "\n".join(f"    {k}_temp_path {os.path.join(d, k)};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must write the temp paths in d
    main = os.path.join(d, "nginx.conf")
    with open(main, "w") as f:
        f.write(f"""# lb-test.py wrapper: the shipped http-level include, as /etc/nginx/nginx.conf includes it.
{user}daemon off;
worker_processes 1;
pid {os.path.join(d, 'nginx.pid')};
error_log {os.path.join(d, 'error.log')} warn;
events {{}}
http {{
    access_log {os.path.join(d, 'access.log')};
{temps}
    include {site};
}}
""")
    check = [tool("nginx"), "-t", "-p", d + "/", "-e", os.path.join(d, "error.log"), "-c", main]
    run = [tool("nginx"), "-p", d + "/", "-e", os.path.join(d, "error.log"), "-c", main]
    return check, run, os.path.join(d, "error.log")


def render_haproxy(d, ips, listen):
    cfg, text = render_shipped("deploy/haproxy/haproxy.cfg", d, ips, r"^(\s*bind ):80()$", listen)
    check = [tool("haproxy"), "-c", "-f", cfg]
    run = [tool("haproxy"), "-db", "-f", cfg, "-p", os.path.join(d, "haproxy.pid")]
    # The shipped `maxconn 20000` needs 2 x 20000 + a few file descriptors; a host whose hard
    # limit is lower (this test machine: 20000, and no CAP_SYS_RESOURCE to raise it; HAProxy
    # started as root on a host raises it itself) starts HAProxy with `-n` just under its limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    m = re.search(r"^\s*maxconn\s+(\d+)", text, re.M)
    if m and hard != resource.RLIM_INFINITY and hard < 2 * int(m.group(1)) + 100:
        run += ["-n", str((hard - 100) // 2)]
    return check, run, os.path.join(d, "haproxy.log")


RENDER = {"nginx": render_nginx, "haproxy": render_haproxy}


class Balancer:
    def __init__(self, kind, d, ips):
        self.kind = kind
        self.d = d
        os.makedirs(d)
        self.ip = "127.0.0.1"
        self.port = free_port(self.ip)
        self.check_cmd, self.run_cmd, self.log = RENDER[kind](d, ips, f"{self.ip}:{self.port}")
        self.proc = None

    def start(self):
        r = subprocess.run(self.check_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(self.check_cmd)} failed:\n{r.stdout}")
        log = open(self.log, "a")
        self.proc = subprocess.Popen(self.run_cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited ({self.proc.returncode}): {rb.tail(self.log)}")
            try:
                status, body = request("POST", self.ip, self.port, "/v1/query", {"concept_path": "lb/probe"}, timeout=5)
                return status == 200, (status, body)
            except OSError as e:
                return False, repr(e)
        rb.wait_until(f"{self.kind} to answer through to the cluster", up, 60, 0.1)

    def broken_after_send(self, victim):
        """How many requests the balancer answered 502 because its connection to the node at
        `victim` broke after the request was sent (which neither config resends)."""
        try:
            with open(self.log, errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0
        if self.kind == "nginx":
            # error.log: `recv() failed (104: Connection reset by peer) while reading response
            # header from upstream, ..., upstream: "http://IP:18180/v1/..."`, or `upstream
            # prematurely closed connection`; refused connects are retried and not counted.
            pat = re.compile(r"(prematurely closed|reset by peer|Broken pipe).*upstream: \"http://" + re.escape(victim) + ":")
        else:
            # option httplog: `... stemedb stemedb_api/node3 Tq/Tw/Tc/Tr/Ta 502 ... SH-- ...`
            pat = re.compile(r" stemedb_api/node3 \S+ 502 .* S[HD]-- ")
        return sum(1 for line in lines if pat.search(line))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            # The process group: nginx's workers and HAProxy run in it.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------------------------------------
# Load


def request(method, ip, port, path, body=None, timeout=CLIENT_TIMEOUT, conn=None):
    """(status, parsed body); raises OSError/HTTPException on a connection error."""
    c = conn or http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = c.getresponse()
        raw = r.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw[:200].decode(errors="replace")
        return r.status, parsed
    finally:
        if conn is None:
            c.close()


def error_code(body):
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


class Load:
    def __init__(self, kind, ip, port):
        self.kind, self.ip, self.port = kind, ip, port
        self.records = []  # (start, end, op, status or None, code or exception text)
        self.acked = []  # assertion ids answered 201
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def worker(self, t):
        conn = None
        n = 0
        last_path = None
        while not self.stop.is_set():
            n += 1
            if n % 2 == 1 or last_path is None:
                path = f"lb/{self.kind}/t{t}/w{n}"
                op, url = "write", "/v1/assert"
                body = {"concept_path": path, "predicate": "seq", "value": n, "agent_id": f"lb-{t}",
                        "request_id": f"lb-{self.kind}-{t}-{n}"}
            else:
                op, url, body = "read", "/v1/query", {"concept_path": last_path}
            if conn is None:
                conn = http.client.HTTPConnection(self.ip, self.port, timeout=CLIENT_TIMEOUT)
            start = time.monotonic()
            try:
                status, answer = request("POST", self.ip, self.port, url, body, conn=conn)
                code = error_code(answer)
            except (OSError, http.client.HTTPException) as e:
                status, code = None, f"connection error: {type(e).__name__}: {e}"
                answer = None
                conn.close()
                conn = None
            end = time.monotonic()
            with self.lock:
                self.records.append((start, end, op, status, code))
                if op == "write" and status == 201:
                    self.acked.append(answer["id"])
            if op == "write" and status == 201:
                last_path = path
        if conn:
            conn.close()


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def node_query_total(ip):
    try:
        c = http.client.HTTPConnection(ip, PORTS["api"], timeout=5)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
    except OSError:
        return None
    m = re.search(r'^stemedb_query_total\{[^}]*\}\s+([0-9.e+]+)', text, re.M)
    return float(m.group(1)) if m else 0.0


def cluster_healthy(ips):
    try:
        status, body = rb.http("GET", f"http://{ips[0]}:{PORTS['admin']}/cluster/health", timeout=2)
    except OSError:
        return False
    return status == 200 and body.get("status") == "healthy"


# ---------------------------------------------------------------------------------------------
# One balancer


def run_one(kind, binary, ips, root, seconds):
    state = os.path.join(root, kind)
    os.makedirs(state)
    services = rb.Services(state, binary)
    cluster = rb.Cluster(state, binary, ips, services)
    balancer = None
    try:
        cluster.prepare()
        cluster.start()
        balancer = Balancer(kind, os.path.join(state, kind), ips)
        balancer.start()
        print(f"lb-test: {kind} on {balancer.ip}:{balancer.port} in front of {', '.join(ips[:3])}", flush=True)
        def dashboard_answers():
            try:
                return True, check_dashboard(balancer)
            except (RuntimeError, http.client.HTTPException) as e:
                return False, str(e)
        dashboard_node = rb.wait_until(f"the dashboard through {kind}", dashboard_answers, 30, 0.5)
        print(f"lb-test: {kind}: the dashboard at /dashboard/ answers (node {dashboard_node})", flush=True)

        victim = ips[2]
        load = Load(kind, balancer.ip, balancer.port)
        threads = [threading.Thread(target=load.worker, args=(t,), daemon=True) for t in range(LOAD_THREADS)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        kill_at = t0 + seconds * KILL_AT / LOAD_SECONDS
        restart_at = t0 + seconds * RESTART_AT / LOAD_SECONDS
        time.sleep(max(0.0, kill_at - time.monotonic()))
        t_kill = time.monotonic()
        services.stop(victim, sig=signal.SIGKILL)
        t_dead = time.monotonic()  # reaped: its sockets are closed
        print(f"lb-test: {kind}: node 3 ({victim}) killed at {t_kill - t0:.1f} s", flush=True)
        time.sleep(max(0.0, restart_at - time.monotonic()))
        t_restart = time.monotonic()
        services.start(victim)
        print(f"lb-test: {kind}: node 3 restarted at {t_restart - t0:.1f} s", flush=True)

        # Traffic back: the restarted node's own query counter (since its start) above 0,
        # polled while the load runs on (past LOAD_SECONDS if need be, up to BACK_TIMEOUT).
        back_after = t_healthy = None
        deadline = t_restart + BACK_TIMEOUT
        while time.monotonic() < deadline and (back_after is None or t_healthy is None):
            if back_after is None and node_query_total(victim):
                back_after = time.monotonic() - t_restart
            if t_healthy is None and cluster_healthy(ips):
                t_healthy = time.monotonic()
            time.sleep(0.2)
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
        load.stop.set()
        for th in threads:
            th.join(CLIENT_TIMEOUT + 5)
        t_end = time.monotonic()

        # Every acknowledged write readable through the balancer.
        def readable(aid):
            for _ in range(3):
                try:
                    status, _ = request("GET", balancer.ip, balancer.port, f"/v1/assertions/{aid}", timeout=10)
                    if status == 200:
                        return None
                    last = status
                except (OSError, http.client.HTTPException) as e:
                    last = repr(e)
                time.sleep(0.2)
            return f"{aid}: {last}"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            unreadable = [r for r in pool.map(readable, load.acked) if r]

        # Classify.
        records = load.records
        failures = [r for r in records if r[3] is None or r[3] >= 400]
        allowed, passed_through, bad = [], [], []
        t_settled = (t_healthy or t_end) + SETTLE_SECONDS
        broken = balancer.broken_after_send(victim)  # 502s the balancer's log puts on node 3
        for r in sorted(failures):
            start, end, op, status, code = r
            if status == 502 and end >= t_kill and broken > 0:
                broken -= 1
                allowed.append(r)
            elif (kind == "haproxy" and status is None and "RemoteDisconnected" in code
                  and start < t_dead + KILL_NOTICE and end >= t_kill):
                # HAProxy's answer to a server that closes a reused connection under a request
                # that is not the first of its client connection: it closes the client
                # connection without a response (and without a log line), HTTP/1.1's "resend if
                # safe"; for a POST that may have reached the node, as a 502 from nginx. A
                # request may also be sent on a pooled connection the kill closed before HAProxy
                # saw it close: requests started up to KILL_NOTICE after the node was reaped.
                allowed.append(r)
            elif status != 502 and start < t_kill <= end and (status, code) in ALLOWED_IN_FLIGHT:
                allowed.append(r)
            elif status in (503, 504) and code in NODE_RETRYABLE and t_kill <= start and end <= t_settled:
                passed_through.append(r)
            else:
                bad.append(r)
        lat = sorted(r[1] - r[0] for r in records)
        across = [r[1] - r[0] for r in records if r[1] >= t_kill and r[0] <= t_kill + 5.0]
        by_outcome = {}
        for r in failures:
            key = f"{r[2]} {r[3] if r[3] is not None else 'conn'} {r[4] or ''}".strip()
            by_outcome[key] = by_outcome.get(key, 0) + 1
        result = {
            "balancer": kind,
            "requests": len(records),
            "writes_acked": len(load.acked),
            "failed": len(failures),
            "failed_allowed": len(allowed),
            "failed_passed_through": len(passed_through),
            "failed_not_allowed": len(bad),
            "healthy_after_restart_s": None if t_healthy is None else round(t_healthy - t_restart, 1),
            "failures_by_outcome": by_outcome,
            "max_latency_across_kill_ms": round(1000 * max(across, default=0.0)),
            "p50_ms": round(1000 * percentile(lat, 50), 1),
            "p99_ms": round(1000 * percentile(lat, 99), 1),
            "max_ms": round(1000 * max(lat, default=0.0)),
            "back_after_s": None if back_after is None else round(back_after, 1),
            "unreadable": len(unreadable),
            "load_seconds": round(t_end - t0, 1),
        }
        problems = []
        if bad:
            problems.append(f"{len(bad)} failed request(s) the config does not explain, e.g. " +
                            "; ".join(f"{op} {st} {cd} at {s - t0:.2f}-{e - t0:.2f} s" for s, e, op, st, cd in bad[:5]))
        if t_healthy is None:
            problems.append(f"the cluster was not healthy within {BACK_TIMEOUT:.0f} s of node 3's restart")
        if back_after is None:
            problems.append(f"node 3 got no query through {kind} within {BACK_TIMEOUT:.0f} s of its restart")
        if unreadable:
            problems.append(f"{len(unreadable)} acknowledged write(s) not readable through {kind}, e.g. {unreadable[:3]}")
        if not load.acked:
            problems.append("no write was acknowledged")
        result["problems"] = problems
        return result
    finally:
        if balancer:
            balancer.stop()
        services.stop_all()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(RENDER), action="append", help="run only this balancer")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data dirs, logs)")
    parser.add_argument("--seconds", type=float, default=LOAD_SECONDS, help="load duration; the kill and restart scale with it")
    parser.add_argument("--bin", help="the stemedb binary")
    parser.add_argument("--hosts", help="four loopback addresses, comma separated (as run-runbooks.py)")
    args = parser.parse_args()
    for name in ("nginx", "haproxy"):
        if not tool(name) and (not args.only or name in args.only):
            print(f"lb-test: {name} is not installed (scripts/setup.sh installs it)", file=sys.stderr)
            return 1

    binary = rb.find_binary(args.bin)
    root = tempfile.mkdtemp(prefix="lb-test.")
    os.chmod(root, 0o755)
    results = []

    def on_signal(signum, _frame):
        raise KeyboardInterrupt  # unwinds through run_one's `finally`, which stops every child

    signal.signal(signal.SIGTERM, on_signal)
    rc = 0
    try:
        shutil.copy2(binary, os.path.join(root, "stemedb"))
        binary = os.path.join(root, "stemedb")
        for kind in args.only or ["nginx", "haproxy"]:
            ips = rb.pick_hosts(args.hosts.split(",") if args.hosts else None)
            print(f"lb-test: {kind}: cluster on {', '.join(ips[:3])}, binary {binary}", flush=True)
            r = run_one(kind, binary, ips, root, args.seconds)
            results.append(r)
            print("lb-test: " + json.dumps(r), flush=True)
    except KeyboardInterrupt:
        print("lb-test: interrupted", file=sys.stderr)
        rc = 130
    except Exception as e:
        print(f"lb-test: FAILED: {e}", file=sys.stderr)
        rc = 1
    finally:
        if args.keep:
            print(f"lb-test: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    if results:
        cols = [("balancer", "balancer"), ("requests", "requests"), ("failed", "failed"),
                ("failed_allowed", "in flight"), ("failed_passed_through", "node retry"),
                ("failed_not_allowed", "not allowed"),
                ("max_latency_across_kill_ms", "max across kill ms"), ("p50_ms", "p50 ms"),
                ("p99_ms", "p99 ms"), ("back_after_s", "traffic back s"), ("unreadable", "unreadable")]
        widths = [max(len(h), *(len(str(r[k])) for r in results)) for k, h in cols]
        print("\n" + "  ".join(h.ljust(w) for (_, h), w in zip(cols, widths)))
        for r in results:
            print("  ".join(str(r[k]).ljust(w) for (k, _), w in zip(cols, widths)))
            for k, v in sorted(r["failures_by_outcome"].items()):
                print(f"    {r['balancer']}: {v} x {k}")
            for p in r["problems"]:
                print(f"    {r['balancer']}: PROBLEM: {p}")
                rc = rc or 1
    print("lb-test: " + ("ok" if rc == 0 else "FAILED"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
