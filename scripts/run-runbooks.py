#!/usr/bin/env python3
"""Runs every shell block of runbooks/*.md against a live 3-node StemeDB cluster.

For each runbook file the runner starts a fresh 3-node cluster of real `stemedb` processes on
127.0.0.1, 127.0.0.2 and 127.0.0.3 with the standard ports (client API 18180, cluster admin
18181, Raft 18182), configured like deploy/config/three-node (config file per node, admin token
in the node's environment file), waits until it is healthy by polling GET /cluster/health,
writes a few assertions, sets up the situation the runbook is about where it can (a node
killed, a node's disk lost, a full disk, an open circuit breaker: see SCENARIOS), then runs
every ```sh / ```bash block of the file in order, each as `bash -euo pipefail` with a timeout,
and finally checks that the runbook left the cluster healthy. ```toml blocks are checked with
`stemedb check-config`. Any non-zero exit, any output matching a must-not-print pattern, or a
cluster left unhealthy is a failure naming the file and the line of the block.

Markers (HTML comments on the lines right before a fence; see runbooks/README.md):
  <!-- runbook: adapted KEY[,KEY...] REASON -->   run in the adapted form KEY (ADAPTATIONS below)
  <!-- runbook: skip REASON -->                   not run (only where it truly cannot run here)
  <!-- runbook: must-not-print REGEX -->          the block fails if its output matches REGEX
  <!-- runbook: on-host N -->                     run as on node N's host (NODE, ADMIN, CONFIG,
                                                  ENV_FILE, DATA_DIR of that node)
  <!-- runbook: timeout SECONDS -->               a longer timeout than the default

Blocks run with these variables set for the test cluster (the runbooks default them to a
production host): NODE, ADMIN, HOSTS, TOKEN, CONFIG, ENV_FILE, DATA_DIR, BIN, NEW_BIN, NEW_IP,
JOIN_VIA, PEER_ADMIN, BACKUP_DIR, NEW_VOLUME, and per runbook LAGGING_IP, DEAD_IP and DIVERGED_IP
(SCENARIOS).
Every STEMEDB_* variable of the caller is removed (nodes refuse unknown ones). `systemctl`,
`journalctl` and `ssh` on PATH are the runner's shims (ADAPTATIONS); a block that calls them
without the matching `adapted` key fails. Every alert of dashboards/alerts/ must be named in
the runbook its runbook_url points to.

Usage: scripts/run-runbooks.py [--only NAME] [--list] [--keep] [-v] [--timeout S] [--hosts A,B,C,D]
Binary: $STEMEDB_BIN, else $CARGO_TARGET_DIR/release/stemedb, else ./target/release/stemedb.
Python 3 standard library only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.abspath(__file__)
PORTS = {"api": 18180, "admin": 18181, "raft": 18182, "dashboard": 18188}
TOKEN = "runbook-test-token"
SHARDS = 8
DEFAULT_TIMEOUT = 180

# Global patterns no block may print: an API error object means a runbook command is wrong
# (bad path, method, body or missing token) or failed; a shim complaint means a missing marker.
GLOBAL_MUST_NOT_PRINT = [
    (r'"error"\s*:\s*\{', "an API error object"),
    (r"run-runbooks shim:", "a shim used without its `adapted` marker"),
]

# The adapted forms. Each key: what the runner does instead of the literal command, and which
# shims it enables. `transform` rewrites the block text before it runs (None: unchanged).
ADAPTATIONS = {
    "systemd": {
        "doc": "`systemctl start|stop|restart|status|is-active|show|daemon-reload stemedb` and "
        "`journalctl -u stemedb` are shims: they act on the test node of the block's host "
        "(`stemedb serve --config $CONFIG` with the variables of $ENV_FILE, like the unit's "
        "EnvironmentFile=, started and stopped with SIGTERM as systemd would, log in the host's "
        "log file); `journalctl -k` is `dmesg`; `journalctl --vacuum-*` does nothing "
        "(no journal here). Restart=on-failure is not emulated.",
        "shims": {"systemctl", "journalctl"},
    },
    "ssh": {
        "doc": "`ssh [USER@]HOST CMD` is a shim: it runs CMD with bash on this machine as the "
        "test node at HOST (its NODE, ADMIN, CONFIG, ENV_FILE, DATA_DIR).",
        "shims": {"ssh"},
    },
    "kernel": {
        "doc": "writes to /proc/sys/vm/drop_caches and /proc/PID/oom_score_adj go to /dev/null: "
        "dropping the page cache would slow down every other process of the shared test "
        "machine, and lowering an OOM score needs CAP_SYS_RESOURCE, which the test container "
        "lacks (root on a real host has it).",
        "transform": lambda text: re.sub(r'>\s*"?/proc/[^\s"]*/(drop_caches|oom_score_adj)"?', "> /dev/null", text),
    },
    "wait": {
        "doc": "`sleep N` with N of 60 or more becomes `sleep 2`: the runbook waits an hour "
        "between two readings, the test checks the commands.",
        "transform": lambda text: re.sub(r"\bsleep\s+(\d{2,})\b", lambda m: "sleep 2" if int(m.group(1)) >= 60 else m.group(0), text),
    },
}

FENCE_RE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([A-Za-z0-9_+-]*)\s*$")
MARKER_RE = re.compile(r"^\s*<!--\s*runbook:\s*([a-z-]+)\s*(.*?)\s*-->\s*$")
RUN_LANGS = {"sh", "bash"}


# ---------------------------------------------------------------------------------------------
# Parsing


class Block:
    def __init__(self, path, line, lang, text, markers):
        self.path = path
        self.line = line
        self.lang = lang
        self.text = text
        self.markers = markers  # list of (kind, arg)
        self.adapt_keys = []
        self.adapt_reason = ""
        self.skip = None
        self.must_not_print = []
        self.host = None
        self.timeout = None
        for kind, arg in markers:
            if kind == "adapted":
                keys, _, reason = arg.partition(" ")
                self.adapt_keys += [k for k in keys.split(",") if k]
                self.adapt_reason = reason.strip()
            elif kind == "skip":
                self.skip = arg
            elif kind == "must-not-print":
                self.must_not_print.append(arg)
            elif kind == "on-host":
                self.host = int(arg)
            elif kind == "timeout":
                self.timeout = int(arg)

    @property
    def where(self):
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


def parse_markdown(path):
    """Fenced blocks of one file with their markers; raises ValueError on malformed markers."""
    blocks = []
    errors = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    pending = []  # (line number, kind, arg)
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER_RE.match(line)
        if marker:
            pending.append((i + 1, marker.group(1), marker.group(2)))
            i += 1
            continue
        fence = FENCE_RE.match(line)
        if fence:
            indent, ticks, lang = fence.groups()
            start = i + 1
            body = []
            i += 1
            while i < len(lines):
                close = re.match(r"^\s*(`{3,}|~{3,})\s*$", lines[i])
                if close and close.group(1)[0] == ticks[0] and len(close.group(1)) >= len(ticks):
                    break
                body.append(lines[i])
                i += 1
            else:
                errors.append(f"{path}:{start}: unclosed fence")
            text = textwrap.dedent("\n".join(body)) + "\n"
            block = Block(path, start, lang.lower(), text, [(k, a) for _, k, a in pending])
            for n, kind, arg in pending:
                if kind not in ("adapted", "skip", "must-not-print", "on-host", "timeout"):
                    errors.append(f"{path}:{n}: unknown marker kind {kind!r}")
                elif kind in ("skip",) and not arg:
                    errors.append(f"{path}:{n}: `skip` needs a reason")
                elif kind == "adapted":
                    keys, _, reason = arg.partition(" ")
                    unknown = [k for k in keys.split(",") if k not in ADAPTATIONS]
                    if unknown or not keys:
                        errors.append(f"{path}:{n}: unknown adaptation {unknown or keys!r} (known: {', '.join(ADAPTATIONS)})")
                    if not reason.strip():
                        errors.append(f"{path}:{n}: `adapted {keys}` needs a reason")
                elif kind == "must-not-print":
                    try:
                        re.compile(arg)
                    except re.error as e:
                        errors.append(f"{path}:{n}: bad regex {arg!r}: {e}")
                elif kind in ("on-host", "timeout") and not arg.isdigit():
                    errors.append(f"{path}:{n}: `{kind}` needs a number")
            if pending and block.lang not in RUN_LANGS | {"toml"}:
                errors.append(f"{path}:{start}: markers before a ```{block.lang} block, which the runner does not run")
            blocks.append(block)
            pending = []
            i += 1
            continue
        if pending and line.strip():
            errors.append(f"{path}:{pending[0][0]}: marker not followed by a fence")
            pending = []
        elif pending and not line.strip():
            errors.append(f"{path}:{pending[0][0]}: marker must be on the line right before the fence")
            pending = []
        i += 1
    if errors:
        raise ValueError("\n".join(errors))
    return blocks


# ---------------------------------------------------------------------------------------------
# The shims (run in the block's process tree; `--shim NAME ARGS...`)


def load_hosts(state):
    with open(os.path.join(state, "hosts.json")) as f:
        return json.load(f)


def shim_main(name, argv):
    state = os.environ.get("RUNBOOK_STATE")
    adapt = set(filter(None, os.environ.get("RUNBOOK_ADAPT", "").split(",")))
    needed = next(k for k, v in ADAPTATIONS.items() if name in v.get("shims", ()))
    if not state or needed not in adapt:
        print(f"run-runbooks shim: `{name}` is the runner's stand-in; mark the block "
              f"<!-- runbook: adapted {needed} REASON --> to use it", file=sys.stderr)
        return 97
    hosts = load_hosts(state)
    host = os.environ.get("RUNBOOK_HOST", "")
    if name == "ssh":
        return shim_ssh(argv, hosts)
    if host not in hosts:
        print(f"run-runbooks: no test host {host!r}", file=sys.stderr)
        return 2
    if name == "journalctl":
        return shim_journalctl(argv, hosts[host])
    # systemctl: ask the runner, which owns the node processes.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(os.path.join(state, "runner.sock"))
        s.sendall((json.dumps({"host": host, "argv": argv}) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    sys.stdout.write(answer["out"])
    sys.stderr.write(answer.get("err", ""))
    return answer["rc"]


def shim_ssh(argv, hosts):
    args = list(argv)
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-o", "-i", "-p", "-l", "-J", "-F") and args:
            args.pop(0)
    if not args:
        print("run-runbooks: ssh without a host", file=sys.stderr)
        return 255
    target = args.pop(0).split("@")[-1]
    if target not in hosts:
        print(f"run-runbooks: ssh to {target!r}, not a test host ({', '.join(hosts)})", file=sys.stderr)
        return 255
    env = dict(os.environ)
    env.update(hosts[target]["env"])
    env["RUNBOOK_HOST"] = target
    command = " ".join(args) if args else "bash"
    # Like a remote shell: the block's -e and pipefail do not carry over.
    return subprocess.call(["bash", "-c", command], env=env)


def shim_journalctl(argv, host):
    args = list(argv)
    lines = None
    follow = False
    priority = None
    unit = None
    i = 0
    while i < len(args):
        a = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        if a in ("-k", "--dmesg"):
            return subprocess.call(["dmesg"])
        if a.startswith("--vacuum"):
            print("Vacuuming done, freed 0B of archived journals (run-runbooks: no journal here)")
            return 0
        if a in ("-u", "--unit"):
            unit, i = value, i + 2
            continue
        if a.startswith("--unit="):
            unit = a.split("=", 1)[1]
        elif a in ("-n", "--lines"):
            lines, i = int(value), i + 2
            continue
        elif a.startswith("--lines="):
            lines = int(a.split("=", 1)[1])
        elif a in ("-f", "--follow"):
            follow = True
        elif a in ("-p", "--priority"):
            priority, i = value, i + 2
            continue
        elif a in ("--since", "--until", "-o", "--output", "-S", "-U"):
            i += 2
            continue
        i += 1
    if unit not in ("stemedb", "stemedb.service"):
        print(f"run-runbooks: journalctl for unit {unit!r}: only stemedb is emulated", file=sys.stderr)
        return 1
    try:
        with open(host["log"], errors="replace") as f:
            text = f.read().splitlines()
    except FileNotFoundError:
        text = []
    if priority:
        levels = {"err": ("ERROR",), "3": ("ERROR",), "warning": ("ERROR", "WARN"), "4": ("ERROR", "WARN")}
        wanted = levels.get(priority, ("ERROR", "WARN", "INFO"))
        text = [t for t in text if any(f'"level":"{lv}"' in t or f" {lv} " in t for lv in wanted) or t.startswith("error:")]
    if lines is not None:
        text = text[-lines:] if lines else []
    for t in text:
        print(t)
    sys.stdout.flush()
    if follow:
        return subprocess.call(["tail", "-n", "0", "-F", host["log"]])
    return 0


# ---------------------------------------------------------------------------------------------
# The node processes


class Services:
    """The `stemedb` processes of the test hosts: all children of the runner."""

    def __init__(self, state, binary):
        self.state = state
        self.binary = binary  # the installed binary the "unit" runs (BIN)
        self.hosts = {}  # ip -> host dict
        self.procs = {}  # ip -> Popen
        self.started_at = {}
        self.stopped = set()  # hosts whose node systemctl stopped: "inactive", not "failed"
        self.lock = threading.RLock()

    def set_hosts(self, hosts):
        self.hosts = hosts
        with open(os.path.join(self.state, "hosts.json"), "w") as f:
            json.dump(hosts, f, indent=1)

    def running(self, ip):
        p = self.procs.get(ip)
        return p is not None and p.poll() is None

    def start(self, ip):
        with self.lock:
            if self.running(ip):
                return 0, ""
            host = self.hosts[ip]
            env = {k: v for k, v in os.environ.items() if not k.startswith("STEMEDB_") and not k.startswith("RUNBOOK_")}
            env_file = host["env"]["ENV_FILE"]
            if os.path.exists(env_file):
                env.update(read_env_file(env_file))
            log = open(host["log"], "a")
            p = subprocess.Popen([self.binary, "serve", "--config", host["env"]["CONFIG"]], stdout=log, stderr=log,
                                 stdin=subprocess.DEVNULL, env=env, cwd=host["dir"], start_new_session=True)
            log.close()
            self.procs[ip] = p
            self.started_at[ip] = time.time()
            self.stopped.discard(ip)
            return 0, ""

    def stop(self, ip, sig=signal.SIGTERM, wait=60):
        with self.lock:
            p = self.procs.get(ip)
            if p is None or p.poll() is not None:
                return 0, ""
            self.stopped.add(ip)
            p.send_signal(sig)
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            return 0, ""

    def unit_state(self, ip):
        p = self.procs.get(ip)
        if p is not None and p.poll() is None:
            return "active"
        if p is None or ip in self.stopped or p.returncode == 0:
            return "inactive"
        return "failed"

    def status_text(self, ip):
        p = self.procs.get(ip)
        host = self.hosts[ip]
        if p is not None and p.poll() is None:
            since = time.strftime("%a %Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at[ip]))
            return 0, (f"● stemedb.service - StemeDB node (run-runbooks: test node {host['id']} at {ip})\n"
                       f"     Active: active (running) since {since}\n"
                       f"   Main PID: {p.pid} (stemedb)\n")
        if self.unit_state(ip) == "inactive":
            return 3, f"○ stemedb.service - StemeDB node\n     Active: inactive (dead)\n"
        if p.returncode < 0:
            how = f"(code=killed, signal={signal.Signals(-p.returncode).name[3:]})"
            result = "signal"
        else:
            how = f"(code=exited, status={p.returncode})"
            result = "exit-code"
        return 3, (f"× stemedb.service - StemeDB node\n"
                   f"     Active: failed (Result: {result})\n"
                   f"   Main PID: {p.pid} {how}\n")

    def systemctl(self, ip, argv):
        args = [a for a in argv if not a.startswith("-") or a in ("-p", "--property")]
        value_only = "--value" in argv
        if not args:
            return 1, "", "run-runbooks: systemctl without a verb\n"
        verb = args[0]
        units = [a for a in args[1:] if a not in ("-p", "--property")]
        if verb in ("daemon-reload", "reset-failed"):
            return 0, "", ""
        prop = None
        if verb == "show":
            if "-p" in args or "--property" in args:
                idx = args.index("-p") if "-p" in args else args.index("--property")
                prop = args[idx + 1]
                units = [u for u in units if u != prop]
            for a in argv:
                if a.startswith("--property="):
                    prop = a.split("=", 1)[1]
        if not units or any(u not in ("stemedb", "stemedb.service") for u in units):
            return 1, "", f"run-runbooks: systemctl {verb} {' '.join(units)}: only the stemedb unit is emulated\n"
        if verb == "start":
            rc, out = self.start(ip)
        elif verb == "stop":
            rc, out = self.stop(ip)
        elif verb == "restart":
            self.stop(ip)
            rc, out = self.start(ip)
        elif verb == "kill":
            sig = signal.SIGKILL if any(a in ("SIGKILL", "KILL", "9") for a in argv) else signal.SIGTERM
            rc, out = self.stop(ip, sig=sig)
        elif verb == "status":
            rc, out = self.status_text(ip)
        elif verb == "is-active":
            state = self.unit_state(ip)
            rc, out = (0 if state == "active" else 3), state + "\n"
        elif verb in ("enable", "disable"):
            rc, out = 0, ""
        elif verb == "show":
            p = self.procs.get(ip)
            values = {"MainPID": str(p.pid) if self.running(ip) else "0",
                      "ActiveState": self.unit_state(ip),
                      "NRestarts": "0",
                      "ExecMainStatus": str(p.returncode if p is not None and p.poll() is not None else 0)}
            if prop not in values:
                return 1, "", f"run-runbooks: systemctl show: property {prop!r} is not emulated\n"
            rc, out = 0, (values[prop] if value_only else f"{prop}={values[prop]}") + "\n"
        else:
            return 1, "", f"run-runbooks: systemctl {verb} is not emulated\n"
        return rc, out, ""

    def stop_all(self, sig=signal.SIGKILL):
        with self.lock:
            for ip, p in list(self.procs.items()):
                if p.poll() is None:
                    try:
                        p.send_signal(sig)
                    except ProcessLookupError:
                        pass
            for p in self.procs.values():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.procs.clear()
            self.stopped.clear()


def read_env_file(path):
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            env[key.strip()] = value
    return env


def serve_shims(services):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            request = json.loads(self.rfile.readline())
            try:
                rc, out, err = services.systemctl(request["host"], request["argv"])
            except Exception as e:  # report to the block, never kill the server
                rc, out, err = 1, "", f"run-runbooks: systemctl failed: {e}\n"
            self.wfile.write((json.dumps({"rc": rc, "out": out, "err": err}) + "\n").encode())

    path = os.path.join(services.state, "runner.sock")
    server = socketserver.ThreadingUnixStreamServer(path, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------------------------------------
# HTTP helpers


def http(method, url, body=None, token=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


def wait_until(what, check, timeout, interval=0.1):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            ok, last = check()
            if ok:
                return last
        except (OSError, ValueError) as e:
            last = repr(e)
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}; last seen: {last}")


# ---------------------------------------------------------------------------------------------
# The cluster


def port_free(ip, port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
            return True
        except OSError:
            return False


def pick_hosts(requested):
    """127.0.0.1-4 when their standard ports are free, else the first free 127.0.N.1-4."""
    candidates = [requested] if requested else [[f"127.0.0.{i}" for i in range(1, 5)]] + \
        [[f"127.0.{n}.{i}" for i in range(1, 5)] for n in range(20, 250)]
    for ips in candidates:
        if all(port_free(ip, p) for ip in ips for p in PORTS.values()):
            return ips
        if requested:
            break
    raise RuntimeError(f"the standard ports are taken on {candidates[0]} (another cluster running?)")


class Cluster:
    def __init__(self, state, binary, ips, services):
        self.state = state
        self.ips = ips  # 4 addresses: three founding nodes and the one add-node.md adds
        self.services = services
        self.binary = binary
        self.mounts = []

    def host(self, ip):
        return self.services.hosts[ip]

    def prepare(self):
        """Fresh host dirs, configs and env files for the three founding nodes and an empty
        fourth host."""
        hosts_root = os.path.join(self.state, "hosts")
        if os.path.exists(hosts_root):
            shutil.rmtree(hosts_root)
        initial = ",".join(f"{i + 1}={ip}:{PORTS['raft']}" for i, ip in enumerate(self.ips[:3]))
        hosts = {}
        for i, ip in enumerate(self.ips):
            d = os.path.join(hosts_root, ip)
            os.makedirs(d)
            env = {
                "NODE": f"http://{ip}:{PORTS['api']}",
                "ADMIN": f"http://{ip}:{PORTS['admin']}",
                "CONFIG": os.path.join(d, "stemedb.toml"),
                "ENV_FILE": os.path.join(d, "stemedb.env"),
                "DATA_DIR": os.path.join(d, "data"),
            }
            hosts[ip] = {"id": i + 1, "dir": d, "log": os.path.join(d, "stemedb.log"), "env": env}
            if i < 3:
                os.makedirs(env["DATA_DIR"])
                with open(env["CONFIG"], "w") as f:
                    f.write(textwrap.dedent(f"""\
                        # Test node {i + 1} of run-runbooks.py, like deploy/config/three-node/node{i + 1}.toml.
                        [node]
                        id = {i + 1}
                        data_dir = "{env['DATA_DIR']}"

                        [server]
                        api_addr = "{ip}:{PORTS['api']}"
                        admin_addr = "{ip}:{PORTS['admin']}"
                        raft_addr = "{ip}:{PORTS['raft']}"
                        shutdown_grace_seconds = 5

                        [cluster]
                        shards = {SHARDS}
                        replication_factor = 3
                        initial_cluster = "{initial}"

                        [storage]
                        max_cache_size_mb = 64
                        write_buffer_mb = 8
                        fsync = true

                        [logging]
                        level = "info"
                        format = "json"
                        """))
                with open(env["ENV_FILE"], "w") as f:
                    f.write(f"# /etc/stemedb/stemedb.env of test node {i + 1}\nSTEMEDB_SECURITY_ADMIN_TOKEN={TOKEN}\n")
        self.services.set_hosts(hosts)

    def mount_tmpfs(self, ip, size="512m"):
        d = self.host(ip)["env"]["DATA_DIR"]
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            self.mounts.append(d)
            return True
        return False

    def unmount_all(self):
        for d in self.mounts:
            subprocess.run(["umount", "-l", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.mounts = []

    def start(self):
        for ip in self.ips[:3]:
            self.services.start(ip)
        first = self.ips[0]

        def healthy():
            for ip in self.ips[:3]:
                p = self.services.procs[ip]
                if p.poll() is not None:
                    raise RuntimeError(f"node at {ip} exited ({p.returncode}): {tail(self.host(ip)['log'])}")
            status, body = http("GET", f"http://{first}:{PORTS['admin']}/cluster/health")
            ok = status == 200 and body.get("status") == "healthy" and body.get("nodes_total") == 3
            if ok:
                _, meta = http("GET", f"http://{first}:{PORTS['admin']}/cluster/meta")
                ok = bool(meta and meta.get("nodes"))
            return ok, body

        wait_until("the cluster to be healthy", healthy, 60)

    def seed(self):
        """A few assertions through every node, and reads, so that queries have data and the
        latency metrics have values."""
        for i in range(24):
            ip = self.ips[i % 3]
            body = {"concept_path": f"infra/db/replica{i % 8}", "predicate": "lag_ms", "value": i,
                    "agent_id": ["ops-bot", "monitor", "sre"][i % 3], "request_id": f"seed-{i}"}
            wait_until("a seed write", lambda: (http("POST", f"http://{ip}:{PORTS['api']}/v1/assert", body)[0] == 201, None), 20)
        for path in ("test/performance", "test/disk"):
            body = {"concept_path": path, "predicate": "ok", "value": True, "agent_id": "ops-bot", "request_id": f"seed-{path}"}
            wait_until("a seed write", lambda: (http("POST", f"http://{self.ips[0]}:{PORTS['api']}/v1/assert", body)[0] == 201, None), 20)
        for i in range(8):
            ip = self.ips[i % 3]
            http("POST", f"http://{ip}:{PORTS['api']}/v1/query", {"concept_path": f"infra/db/replica{i}"})
        http("POST", f"http://{self.ips[0]}:{PORTS['api']}/v1/query", {"concept_prefix": "infra", "lens": "history"})

    def healthy_end_state(self, timeout=90):
        """Every member of the cluster metadata up and every shard with a leader."""
        def check():
            for ip in self.ips:
                if not self.services.running(ip):
                    continue
                status, body = http("GET", f"http://{ip}:{PORTS['admin']}/cluster/health")
                if status == 200 and body.get("status") == "healthy":
                    _, members = http("GET", f"http://{ip}:{PORTS['admin']}/cluster/members")
                    if all(m["status"] == "UP" for m in members["members"]):
                        return True, body
                return False, body
            return False, "no node running"
        return wait_until("the cluster to be healthy at the end of the runbook", check, timeout, 0.5)


def tail(path, n=8):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------
# Scenarios: the situation each runbook is about, set up before its blocks run.


def wait_seen_down(cluster, node_id, via_ip):
    """Until `via_ip` reports member `node_id` DOWN and every shard it hosts led again."""
    def down():
        _, members = http("GET", f"http://{via_ip}:{PORTS['admin']}/cluster/members")
        _, health = http("GET", f"http://{via_ip}:{PORTS['admin']}/cluster/health")
        seen = any(m["id"] == node_id and m["status"] == "DOWN" for m in members["members"])
        return seen and health.get("status") == "degraded", health
    wait_until(f"node {node_id} to be seen DOWN", down, 30)


def scenario_kill_node3(cluster, wipe=False):
    ip = cluster.ips[2]
    cluster.services.stop(ip, sig=signal.SIGKILL)
    if wipe:
        shutil.rmtree(cluster.host(ip)["env"]["DATA_DIR"])
    wait_seen_down(cluster, 3, cluster.ips[0])
    return f"node 3 ({ip}) killed with SIGKILL" + (" and its data dir deleted (a lost disk)" if wipe else "")


def scenario_breaker(cluster):
    """More than circuit_breaker.max_invalid_per_sec (50) invalid writes of one agent in one
    second through node 1: its breaker opens by itself (cause invalid_rate)."""
    import http.client as httpclient
    ip = cluster.ips[0]
    for _ in range(5):
        conn = httpclient.HTTPConnection(ip, PORTS["api"], timeout=5)
        body = json.dumps({"concept_path": "Not A Path!", "predicate": "p", "value": 1, "agent_id": "noisy-bot"})
        for _ in range(120):
            conn.request("POST", "/v1/assert", body, {"Content-Type": "application/json"})
            conn.getresponse().read()
        conn.close()
        status, listing = http("GET", f"http://{ip}:{PORTS['api']}/v1/admin/circuit-breaker", token=TOKEN)
        if status == 200 and any(b["agent_id"] == "noisy-bot" for b in listing["breakers"]):
            break
    else:
        raise RuntimeError(f"the breaker of noisy-bot did not open: {listing}")
    # A quarantined claim: a root authority's claim, contradicted by an agent without authority.
    api = f"http://{ip}:{PORTS['api']}"
    status, answer = http("POST", f"{api}/v1/admin/authority/roots", {"agent_id": "cto", "level": 90}, token=TOKEN)
    if status not in (200, 201):
        raise RuntimeError(f"root authority: {status} {answer}")
    for agent, value in (("cto", 100), ("intern", 999)):
        body = {"concept_path": "finance/budget", "predicate": "total", "value": value, "agent_id": agent}
        wait_until("a claim", lambda: (http("POST", f"{api}/v1/assert", body)[0] == 201, None), 20)
    _, quarantined = http("GET", f"{api}/v1/admin/quarantine", token=TOKEN)
    if not quarantined["quarantined"]:
        raise RuntimeError(f"the contradicting claim was not quarantined: {quarantined}")
    return ("agent noisy-bot sent 120 invalid writes within a second: its breaker opened (invalid_rate); "
            "agent intern contradicted root authority cto on finance/budget: one claim quarantined")


def scenario_disk_full_prepare(cluster):
    return cluster.mount_tmpfs(cluster.ips[0])


def scenario_disk_full(cluster, mounted):
    if not mounted:
        return "NOT SET UP: cannot mount a small filesystem here (needs root); the blocks run against a healthy cluster"
    ip = cluster.ips[0]
    data_dir = cluster.host(ip)["env"]["DATA_DIR"]
    ballast = os.path.join(data_dir, "core.4242")
    chunk = b"\0" * (1 << 20)
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    old = time.time() - 3 * 86400
    os.utime(ballast, (old, old))
    deadline = time.time() + 90
    i = 0
    while cluster.services.running(ip):
        if time.time() > deadline:
            raise RuntimeError("node 1 kept running on a full disk")
        i += 1
        http("POST", f"http://{cluster.ips[1]}:{PORTS['api']}/v1/assert",
             {"concept_path": f"disk/during{i % 50}", "predicate": "p", "value": "x" * 2000, "agent_id": f"filler{i % 7}"})
    wait_seen_down(cluster, 1, cluster.ips[1])
    return ("node 1's data dir is a 512 MiB tmpfs, filled by a 3-day-old core dump (core.4242) until "
            "node 1 stopped on ENOSPC")


SCENARIOS = {
    # No node lags in a fresh test cluster: the test names node 3 so that the restart runs.
    "high-query-latency.md": {"vars": lambda c: {"LAGGING_IP": c.ips[2]}},
    # No replica differs in a fresh test cluster: the test names node 3 so that the check and
    # repair (POST /cluster/sync) runs.
    "replica-divergence.md": {"vars": lambda c: {"DIVERGED_IP": c.ips[2]}},
    "node-down.md": {"after_start": lambda c, _: scenario_kill_node3(c)},
    "replace-dead-node.md": {"after_start": lambda c, _: scenario_kill_node3(c, wipe=True),
                             "vars": lambda c: {"DEAD_IP": c.ips[2]}},
    "circuit-breakers.md": {"after_start": lambda c, _: scenario_breaker(c)},
    "quarantine-backlog.md": {"after_start": lambda c, _: scenario_breaker(c)},
    "disk-full.md": {"before_start": scenario_disk_full_prepare, "after_start": scenario_disk_full},
}


# ---------------------------------------------------------------------------------------------
# Running


def find_binary(explicit):
    candidates = [explicit, os.environ.get("STEMEDB_BIN")]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "release", "stemedb"))
    candidates.append(os.path.join(ROOT, "target", "release", "stemedb"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise RuntimeError(f"no stemedb binary: set STEMEDB_BIN or build it (looked at {[c for c in candidates if c]})")


def block_env(state, cluster, block, extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMEDB_")}
    ip = cluster.ips[(block.host or 1) - 1]
    host = cluster.host(ip)
    env.update(host["env"])
    env.update(extra)
    env["RUNBOOK_HOST"] = ip
    env["RUNBOOK_STATE"] = state
    env["RUNBOOK_ADAPT"] = ",".join(block.adapt_keys)
    env["PATH"] = os.path.join(state, "shims") + os.pathsep + os.path.join(state, "bin") + os.pathsep + env.get("PATH", "")
    return env


def run_block(state, cluster, block, extra, workdir, default_timeout, verbose):
    text = block.text
    for key in block.adapt_keys:
        transform = ADAPTATIONS[key].get("transform")
        if transform:
            text = transform(text)
    script = os.path.join(state, "block.sh")
    with open(script, "w") as f:
        f.write(text)
    env = block_env(state, cluster, block, extra)
    timeout = block.timeout or default_timeout
    started = time.time()
    p = subprocess.Popen(["bash", "-euo", "pipefail", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=env, cwd=workdir, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        rc = p.returncode
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        rc = None
        timed_out = True
    else:
        try:  # anything the block left running in its session (never the nodes: those are ours)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = out.decode(errors="replace")
    elapsed = time.time() - started
    problems = []
    if timed_out:
        problems.append(f"timed out after {timeout}s")
    elif rc != 0:
        problems.append(f"exit status {rc}")
    for pattern in block.must_not_print:
        m = re.search(pattern, output, re.M)
        if m:
            problems.append(f"printed {m.group(0)!r}, which matches must-not-print {pattern!r}")
    for pattern, what in GLOBAL_MUST_NOT_PRINT:
        m = re.search(pattern, output, re.M)
        if m:
            problems.append(f"printed {what}: {output[max(0, m.start() - 80):m.end() + 160]!r}")
    if verbose or problems:
        print(textwrap.indent(output.rstrip()[-6000:] or "(no output)", "     | "))
    return problems, elapsed


def check_toml(state, block):
    path = os.path.join(state, "snippet.toml")
    with open(path, "w") as f:
        f.write(block.text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMEDB_")}
    r = subprocess.run([os.path.join(state, "bin", "stemedb"), "check-config", path], capture_output=True, text=True, env=env)
    return [] if r.returncode == 0 else [f"stemedb check-config refuses it: {r.stderr.strip()}"]


def check_alerts_named(runbook_dir):
    """Every alert of dashboards/alerts/*.yml is named in the runbook its runbook_url points to
    (the rules are YAML; a line scan is enough for their fixed layout, and keeps this stdlib)."""
    problems = []
    alerts_dir = os.path.join(ROOT, "dashboards", "alerts")
    if not os.path.isdir(alerts_dir):
        return problems
    for name in sorted(os.listdir(alerts_dir)):
        if not name.endswith((".yml", ".yaml")):
            continue
        alert = None
        with open(os.path.join(alerts_dir, name)) as f:
            for line in f:
                m = re.match(r"\s*-\s*alert:\s*(\S+)", line)
                if m:
                    alert = m.group(1)
                m = re.match(r"\s*runbook_url:\s*['\"]?runbooks/([^#'\"\s]+)", line)
                if m and alert:
                    path = os.path.join(runbook_dir, m.group(1))
                    if not os.path.isfile(path):
                        problems.append(f"alert {alert}: runbook {m.group(1)} does not exist")
                    elif not re.search(rf"\b{re.escape(alert)}\b", open(path, encoding="utf-8").read()):
                        problems.append(f"alert {alert}: not named in runbooks/{m.group(1)}, its runbook_url")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run only runbooks whose file name contains this")
    parser.add_argument("--list", action="store_true", help="list the blocks and their markers, run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data dirs, logs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every block's output")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="default timeout per block, seconds")
    parser.add_argument("--bin", help="the stemedb binary (default: $STEMEDB_BIN, $CARGO_TARGET_DIR/release/stemedb, ./target/release/stemedb)")
    parser.add_argument("--hosts", help="four loopback addresses, comma separated (default: 127.0.0.1-4, or 127.0.N.1-4 if taken)")
    parser.add_argument("--shim", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shim:
        return shim_main(args.shim[0], args.shim[1:])

    runbook_dir = os.path.join(ROOT, "runbooks")
    files = sorted(f for f in os.listdir(runbook_dir) if f.endswith(".md"))
    if args.only:
        files = [f for f in files if any(o in f for o in args.only)]
    parsed = {}
    errors = []
    for name in files:
        try:
            parsed[name] = parse_markdown(os.path.join(runbook_dir, name))
        except ValueError as e:
            errors.append(str(e))
    if errors:
        print("run-runbooks: malformed markers:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    alert_problems = check_alerts_named(runbook_dir)
    if alert_problems:
        print("run-runbooks: alerts and runbooks disagree:\n  " + "\n  ".join(alert_problems), file=sys.stderr)
        return 1
    if args.list:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--list | head` ends quietly
        for name, blocks in parsed.items():
            for b in blocks:
                if b.lang in RUN_LANGS | {"toml"}:
                    kind = "skip" if b.skip else ("adapted " + ",".join(b.adapt_keys) if b.adapt_keys else
                                                  ("check-config" if b.lang == "toml" else "run"))
                    print(f"{b.where:45} {b.lang:5} {kind}")
        return 0

    binary = find_binary(args.bin)
    ips = pick_hosts(args.hosts.split(",") if args.hosts else None)
    state = tempfile.mkdtemp(prefix="run-runbooks.")
    services = Services(state, os.path.join(state, "bin", "stemedb"))
    cluster = Cluster(state, binary, ips, services)
    server = None

    def cleanup(*_):
        services.stop_all()
        cluster.unmount_all()
        if server:
            server.shutdown()
        if args.keep:
            print(f"run-runbooks: kept {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)

    def on_signal(signum, _frame):
        cleanup()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        os.makedirs(os.path.join(state, "bin"))
        os.makedirs(os.path.join(state, "shims"))
        shutil.copy2(binary, os.path.join(state, "bin", "stemedb"))
        shutil.copy2(binary, os.path.join(state, "stemedb-new"))
        for name in ("systemctl", "journalctl", "ssh"):
            path = os.path.join(state, "shims", name)
            with open(path, "w") as f:
                f.write(f'#!/bin/sh\nexec "{sys.executable}" "{SELF}" --shim {name} "$@"\n')
            os.chmod(path, 0o755)
        server = serve_shims(services)
        print(f"run-runbooks: binary {binary}")
        print(f"run-runbooks: hosts {', '.join(ips[:3])} (a fourth, {ips[3]}, for add-node.md), ports "
              f"{PORTS['api']}/{PORTS['admin']}/{PORTS['raft']}; state in {state}")
        return run_all(args, state, cluster, parsed)
    finally:
        cleanup()


def run_all(args, state, cluster, parsed):
    counts = {"run": 0, "adapted": 0, "skipped": 0, "toml": 0, "failed": 0}
    failures = []
    skipped = []
    adapted_used = {}
    started_all = time.time()
    for name, blocks in parsed.items():
        runnable = [b for b in blocks if b.lang in RUN_LANGS or b.lang == "toml"]
        if not runnable:
            continue
        print(f"== runbooks/{name}")
        for b in runnable:
            if b.lang == "toml":
                if b.skip:
                    counts["skipped"] += 1
                    skipped.append((b.where, b.skip))
                    continue
                problems = check_toml(state, b)
                counts["toml"] += 1
                if problems:
                    counts["failed"] += 1
                    failures.append((b.where, problems))
                    print(f"FAIL {b.where} (toml)\n     " + "\n     ".join(problems))
        shell = [b for b in runnable if b.lang in RUN_LANGS]
        if not shell:
            continue
        scenario = SCENARIOS.get(name, {})
        cluster.services.stop_all()
        cluster.unmount_all()
        cluster.prepare()
        extra = {
            "HOSTS": " ".join(cluster.ips[:3]),
            "TOKEN": TOKEN,
            "BIN": os.path.join(state, "bin", "stemedb"),
            "NEW_BIN": os.path.join(state, "stemedb-new"),
            "NEW_IP": cluster.ips[3],
            "PEER_ADMIN": cluster.host(cluster.ips[1])["env"]["ADMIN"],
            "JOIN_VIA": f"{cluster.ips[0]}:{PORTS['admin']}",
            "BACKUP_DIR": os.path.join(state, "backup"),
            "NEW_VOLUME": os.path.join(state, "new-volume"),
        }
        for d in ("backup", "new-volume"):
            shutil.rmtree(os.path.join(state, d), ignore_errors=True)
        if "vars" in scenario:
            extra.update(scenario["vars"](cluster))
        workdir = os.path.join(state, "work", name)
        os.makedirs(workdir, exist_ok=True)
        try:
            prepared = scenario["before_start"](cluster) if "before_start" in scenario else None
            t = time.time()
            cluster.start()
            cluster.seed()
            print(f"     cluster up and seeded in {time.time() - t:.1f}s")
            if "after_start" in scenario:
                print(f"     scenario: {scenario['after_start'](cluster, prepared)}")
        except Exception as e:
            counts["failed"] += 1
            failures.append((f"runbooks/{name}", [f"cluster set-up failed: {e}"]))
            print(f"FAIL runbooks/{name}: cluster set-up failed: {e}")
            continue
        file_failed = False
        for b in shell:
            if b.skip:
                counts["skipped"] += 1
                skipped.append((b.where, b.skip))
                print(f"skip {b.where}: {b.skip}")
                continue
            if file_failed:
                print(f"---- {b.where}: not run (an earlier block of this file failed)")
                continue
            problems, elapsed = run_block(state, cluster, b, extra, workdir, args.timeout, args.verbose)
            counts["run"] += 1
            tag = ""
            if b.adapt_keys:
                counts["adapted"] += 1
                for k in b.adapt_keys:
                    adapted_used.setdefault(k, []).append(b.where)
                tag = f" [adapted: {','.join(b.adapt_keys)}]"
            if b.host:
                tag += f" [on host {b.host}]"
            if problems:
                counts["failed"] += 1
                failures.append((b.where, problems))
                file_failed = True
                print(f"FAIL {b.where}{tag} ({elapsed:.1f}s)\n     " + "\n     ".join(problems))
                for ip in cluster.ips:
                    if os.path.exists(cluster.host(ip)["log"]):
                        print(f"     log of {ip}: ...{tail(cluster.host(ip)['log'], 2)[-400:]}")
            else:
                print(f"ok   {b.where}{tag} ({elapsed:.1f}s)")
        if not file_failed:
            try:
                cluster.healthy_end_state()
                print(f"ok   runbooks/{name}: the cluster is healthy afterwards")
            except RuntimeError as e:
                counts["failed"] += 1
                failures.append((f"runbooks/{name}", [str(e)]))
                print(f"FAIL runbooks/{name}: {e}")
    print()
    print(f"run-runbooks: {counts['run']} shell blocks run ({counts['adapted']} adapted), "
          f"{counts['skipped']} skipped, {counts['toml']} toml blocks checked with stemedb check-config, "
          f"{counts['failed']} failed, in {time.time() - started_all:.0f}s")
    for key, where in sorted(adapted_used.items()):
        print(f"  adapted {key} ({len(where)}): {ADAPTATIONS[key]['doc']}")
    for where, reason in skipped:
        print(f"  skipped {where}: {reason}")
    if failures:
        print("FAILED:")
        for where, problems in failures:
            print(f"  {where}: {'; '.join(problems)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
