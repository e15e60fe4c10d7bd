#!/usr/bin/env python3
"""Contract tests of the served OpenAPI documents with schemathesis, against a live node.

Starts one `stemedb` node on loopback (the first free 127.0.N.1 whose 18180/18181/18182 are
free) with an admin token, seeds it (claims, a vote, a retraction, a root authority and a grant,
a quarantined claim, a tripped breaker), then for each API (the client API and node admin on
18180, the cluster admin on 18181):

- reads `GET /openapi.json` from the node itself (the document the code generates);
- runs schemathesis against it (the examples, coverage and fuzzing phases, positive and negative
  data) with the checks: no 5xx answer (`not_a_server_error`), every status documented for its
  operation (`status_code_conformance`), every body valid against its documented schema
  (`response_schema_conformance`: an error's `code` must be one documented for that status),
  the documented content types and headers, and no schema-violating request accepted
  (`negative_data_rejection`); every request has a timeout, so a hang fails too;
- checks the node is still healthy afterwards and did not crash.

Operations that would wreck the node under test rather than test it are left out, and listed:
membership changes (a fuzzed member would become a voter that never answers) and backup start
(a fuzzed destination is a directory anywhere on this machine).

Usage: scripts/contract-test.py [--long] [--examples N] [--seed S] [--bin PATH] [--keep]
  default: a short run for the default suite (scripts/test.sh): 100 examples per operation;
  --long: 1000 examples per operation and the stateful phase (its own command, not in the suite).
Binary: --bin, $STEMEDB_BIN, $CARGO_TARGET_DIR/release/stemedb, or ./target/release/stemedb.
Schemathesis: the virtualenv scripts/setup.sh fills ($MOTO_VENV, else ~/.cache/stemedb-venv).
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("run_runbooks", os.path.join(ROOT, "scripts", "run-runbooks.py"))
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)

TOKEN = "contract-test-token"
PORTS = {"api": 18180, "admin": 18181, "raft": 18182}
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
])
# Not checked: `positive_data_acceptance` (every schema-valid request accepted). The schemas now
# state the formats validation checks (agent ids, concept paths and prefixes, predicates,
# assertion ids, limits, levels, confidence, consistency, breaker states), and the checks above
# hold the server to them: anything outside a pattern must be refused. Tried again on 2026-12-06
# with those: 21 operations still had a schema-valid request refused, for what a schema cannot say
# or this check reads differently: opaque cursors and heap-profile names (only what the server
# handed out is valid), empty or non-date times, cross-field rules ("exactly one of concept_path
# and concept_prefix", no grant to oneself, a superseded claim on the same concept), integers sent
# as `0.0` (JSON Schema counts them as integers; serde does not) or past 64 bits, a `null` body
# where the body is optional, a vote of 0, grant ids and node ids typed as strings.
# (Python's `re`, which schemathesis uses, lets `$` match before a final newline, so it also takes
# "anonymous\n" for a valid agent id; ECMA-262, the schemas' dialect, does not.)
# (method, path) left out, and why.
EXCLUDED = {
    "api": [("POST", "/v1/admin/backup", "a fuzzed destination is any directory on this machine")],
    "admin": [
        ("POST", "/cluster/members", "a fuzzed member becomes a meta-group voter that never answers"),
        ("DELETE", "/cluster/members/{id}", "decommissions the node under test"),
    ],
}


def venv():
    return os.environ.get("MOTO_VENV", os.path.join(os.path.expanduser("~"), ".cache", "stemedb-venv"))


def pick_ip():
    for n in [0] + list(range(30, 250)):
        ip = f"127.0.{n}.1"
        if all(rb.port_free(ip, p) for p in PORTS.values()):
            return ip
    raise RuntimeError("no loopback address with 18180-18182 free")


def start_node(binary, ip, state):
    data = os.path.join(state, "data")
    os.makedirs(data)
    config = os.path.join(state, "stemedb.toml")
    with open(config, "w") as f:
        f.write(textwrap.dedent(f"""\
            [node]
            id = 1
            data_dir = "{data}"

            [server]
            api_addr = "{ip}:{PORTS['api']}"
            admin_addr = "{ip}:{PORTS['admin']}"
            raft_addr = "{ip}:{PORTS['raft']}"
            dashboard_addr = "off"
            shutdown_grace_seconds = 5

            [cluster]
            shards = 4
            replication_factor = 1

            [storage]
            max_cache_size_mb = 64
            write_buffer_mb = 8

            [circuit_breaker]
            mode = "quarantine"

            [logging]
            level = "warn"
            format = "json"
            """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMEDB_")}
    env["STEMEDB_SECURITY_ADMIN_TOKEN"] = TOKEN
    log = open(os.path.join(state, "stemedb.log"), "w")
    proc = subprocess.Popen([binary, "serve", "--config", config], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    api = f"http://{ip}:{PORTS['api']}"

    def healthy():
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited ({proc.returncode}): {rb.tail(log.name)}")
        status, body = rb.http("GET", f"{api}/v1/health")
        return status == 200, body

    rb.wait_until("the node to be healthy", healthy, 60)
    return proc, log.name


def seed(ip):
    """Data for the fuzzed reads to find: claims, a vote, a retraction, authority, a quarantined
    claim and a breaker."""
    api = f"http://{ip}:{PORTS['api']}"

    def call(method, path, body=None, want=(200, 201)):
        status, answer = rb.http(method, f"{api}{path}", body, token=TOKEN, timeout=10)
        if status not in want:
            raise RuntimeError(f"seed {method} {path}: {status} {answer}")
        return answer

    ids = []
    for i in range(6):
        body = {"concept_path": f"projects/p{i % 3}", "predicate": "status", "value": {"n": i},
                "agent_id": ["alice", "bob"][i % 2], "confidence": 0.5 + i / 20, "request_id": f"seed-{i}"}
        ids.append(call("POST", "/v1/assert", body)["id"])
    call("POST", "/v1/vote", {"assertion_id": ids[0], "agent_id": "bob", "value": 1})
    call("POST", "/v1/retract", {"assertion_id": ids[1], "agent_id": "bob", "reason": "seed"})
    call("POST", "/v1/admin/authority/roots", {"agent_id": "alice", "level": 90})
    call("POST", "/v1/authority/grants", {"grantor": "alice", "grantee": "bob", "concept_prefix": "projects", "level": 50})
    call("POST", "/v1/admin/circuit-breaker/trip", {"agent_id": "mallory", "reason": "seed"})
    call("POST", "/v1/assert", {"concept_path": "projects/p0", "predicate": "status", "value": 1, "agent_id": "mallory"})
    call("POST", "/v1/query", {"concept_prefix": "projects", "lens": "history"})


def fetch_document(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        if r.status != 200 or not r.headers.get("Content-Type", "").startswith("application/json"):
            raise RuntimeError(f"{url}: {r.status} {r.headers.get('Content-Type')}")
        return json.loads(r.read())


def run_schemathesis(name, base, document, args, reports):
    operations = sum(1 for item in document["paths"].values() for m in item if m in ("get", "post", "delete", "put", "patch"))
    command = [
        os.path.join(venv(), "bin", "schemathesis"), "run", f"{base}/openapi.json",
        "--url", base,
        "--checks", CHECKS,
        "--max-examples", str(args.examples),
        "--phases", "examples,coverage,fuzzing,stateful" if args.long else "examples,coverage,fuzzing",
        "--request-timeout", "15",
        # One worker: with two threads, CPython 3.11 (Debian 12) once failed hypothesis's ast.parse of
        # a filter's lambda with "AST constructor recursion depth mismatch",
        # a runtime error of the tool with every generated case passing.
        "--workers", "1",
        "--seed", str(args.seed),
        "--header", f"Authorization: Bearer {TOKEN}",
        "--suppress-health-check", "all",
        "--report", "junit",
        "--report-junit-path", os.path.join(reports, f"{name}.xml"),
        "--warnings", "off",
    ]
    for method, path, _ in EXCLUDED[name]:
        command += ["--exclude-operation-id", operation_id(document, method, path)]
    print(f"\n== {name}: {operations} operations in {base}/openapi.json, "
          f"{len(EXCLUDED[name])} left out; {args.examples} examples each", flush=True)
    for method, path, why in EXCLUDED[name]:
        print(f"   left out: {method} {path}: {why}")
    started = time.time()
    result = subprocess.run(command, cwd=reports, timeout=args.timeout)
    print(f"== {name}: schemathesis exited {result.returncode} after {time.time() - started:.0f} s", flush=True)
    return result.returncode == 0


def operation_id(document, method, path):
    operation = document["paths"][path][method.lower()]
    return operation["operationId"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="1000 examples per operation and the stateful phase")
    parser.add_argument("--examples", type=int, help="examples per operation (default 100, or 1000 with --long)")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CONTRACT_SEED", "20261205")))
    parser.add_argument("--timeout", type=int, help="seconds for each API's run (default 900, 3600 with --long)")
    parser.add_argument("--bin")
    parser.add_argument("--keep", action="store_true", help="keep the node's directory")
    args = parser.parse_args()
    args.examples = args.examples or (1000 if args.long else 100)
    args.timeout = args.timeout or (3600 if args.long else 900)
    binary = rb.find_binary(args.bin)
    if not os.access(os.path.join(venv(), "bin", "schemathesis"), os.X_OK):
        raise SystemExit(f"no schemathesis in {venv()}: run scripts/setup.sh")
    ip = pick_ip()
    state = tempfile.mkdtemp(prefix="stemedb-contract-")
    reports = os.path.join(ROOT, "target", "contract-reports")
    os.makedirs(reports, exist_ok=True)
    proc = None
    ok = False
    try:
        proc, log = start_node(binary, ip, state)
        seed(ip)
        results = {}
        for name in ("api", "admin"):
            base = f"http://{ip}:{PORTS[name]}"
            document = fetch_document(f"{base}/openapi.json")
            results[name] = run_schemathesis(name, base, document, args, reports)
        alive = proc.poll() is None
        status, health = rb.http("GET", f"http://{ip}:{PORTS['api']}/v1/health")
        print(f"\nafter the runs: node {'running' if alive else 'EXITED'}, /v1/health {status} {health}")
        ok = all(results.values()) and alive and status == 200
        if not ok:
            print(f"node log (last lines): {rb.tail(log, 20)}")
        print(f"contract tests: {'passed' if ok else 'FAILED'} ({', '.join(f'{k}: {v}' for k, v in results.items())}); "
              f"JUnit reports in {reports}")
    finally:
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if args.keep:
            print(f"kept {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
