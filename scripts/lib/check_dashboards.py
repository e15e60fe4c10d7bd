#!/usr/bin/env python3
"""Checks of dashboards/ that promtool does not make (run by scripts/check-dashboards.sh).

- Every Grafana panel but a row has targets, every target an `expr`; dashboard uids are unique
  and panels use the ${DS_PROMETHEUS} data source.
- Every metric an alert rule or a panel reads is one the node exports (names taken from the
  string literals of node/src), one of the prometheus crate's process metrics, `up`, or one of
  the node_exporter metrics listed below (host memory, disk space, inodes, disk I/O).
- Every alert has `for`, a severity label, summary, description and a runbook_url under
  runbooks/ (the file must exist once runbooks/ does), and is tested by dashboards/alerts/tests
  both firing and not firing.
- It writes every panel expression, Grafana variables replaced, into a rule file for
  `promtool check rules` to parse (argv[2]).

Usage: check_dashboards.py REPO_ROOT PANEL_RULES_OUT

Importable (scripts/prometheus-live-test.py): rule_expressions() and panel_expressions() list
every alert rule and panel expression; importing runs no check.
"""
import glob
import json
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PANEL_RULES_OUT = None

# The prometheus crate's process collector (Linux), registered by node/src/metrics.
PROCESS_METRICS = {
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_open_fds", "process_max_fds", "process_start_time_seconds", "process_threads",
}
# node_exporter metrics the runbooks mean where they speak of the host.
NODE_EXPORTER_METRICS = {
    "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes", "node_memory_SwapTotal_bytes",
    "node_memory_SwapFree_bytes", "node_filesystem_avail_bytes", "node_filesystem_size_bytes",
    "node_filesystem_files_free", "node_filesystem_files", "node_disk_io_time_seconds_total",
    "node_disk_read_bytes_total", "node_disk_written_bytes_total",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "bool", "offset", "inf", "nan"}
# Grafana variables, replaced by what "All" selects.
GRAFANA_VARIABLES = {"$instance": ".*"}

failures = []


def fail(message):
    failures.append(message)


def exported_metrics():
    names = set()
    pattern = re.compile(r'"((?:stemedb_|replication_lag_seconds|assertions_indexed_total)[a-z0-9_]*)"')
    for path in glob.glob(os.path.join(ROOT, "node/src/**/*.rs"), recursive=True):
        with open(path) as f:
            names.update(pattern.findall(f.read()))
    return names


def metric_names(expr):
    """Names of the series an expression selects (a tolerant scan, not a PromQL parser)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name in KEYWORDS:
            continue
        names.add(name)
    return names


def known(name, exported):
    if name in exported or name in PROCESS_METRICS or name in NODE_EXPORTER_METRICS or name == "up":
        return True
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base != name and base in exported


def rule_expressions(root=None):
    """(file name, group name, rule, rule name) of every rule of dashboards/alerts/*.yml."""
    for path in sorted(glob.glob(os.path.join(root or ROOT, "dashboards/alerts/*.yml"))):
        with open(path) as f:
            doc = yaml.safe_load(f)
        for group in doc.get("groups", []):
            for rule in group.get("rules", []):
                yield os.path.basename(path), group.get("name"), rule, rule.get("alert") or rule.get("record")


def dashboard_panels(board):
    """Every panel of a dashboard, those nested in rows included."""
    panels = list(board.get("panels", []))
    for panel in list(panels):
        panels.extend(panel.get("panels", []))
    return panels


def panel_expressions(root=None):
    """(file name, panel, target, expression with the Grafana variables replaced) of every panel
    target with an expression in dashboards/grafana/*.json (rows skipped)."""
    for path in sorted(glob.glob(os.path.join(root or ROOT, "dashboards/grafana/*.json"))):
        with open(path) as f:
            board = json.load(f)
        for panel in dashboard_panels(board):
            if panel.get("type") == "row":
                continue
            for target in panel.get("targets") or []:
                expr = (target.get("expr") or "").strip()
                if expr:
                    for variable, value in GRAFANA_VARIABLES.items():
                        expr = expr.replace(variable, value)
                    yield os.path.basename(path), panel, target, expr


def check_rules(exported):
    alerts = {}
    unchecked_runbooks = set()
    for base, _group, rule, name in rule_expressions():
        where = f"{base}: {name}"
        for metric in metric_names(rule["expr"]):
            if not known(metric, exported):
                fail(f"{where}: reads {metric}, which neither the node nor node_exporter exports")
        if "alert" not in rule:
            continue
        alerts[name] = where
        if "for" not in rule:
            fail(f"{where}: no `for`")
        if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            fail(f"{where}: severity label missing or not critical/warning/info")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not annotations.get(key):
                fail(f"{where}: no {key} annotation")
        runbook = annotations.get("runbook_url", "")
        if not runbook.startswith("runbooks/"):
            fail(f"{where}: runbook_url {runbook!r} is not under runbooks/")
        elif os.path.isdir(os.path.join(ROOT, "runbooks")):
            if not os.path.isfile(os.path.join(ROOT, runbook.split("#")[0])):
                fail(f"{where}: {runbook} does not exist")
        else:
            unchecked_runbooks.add(runbook)
    if unchecked_runbooks:
        print(f"note: runbooks/ does not exist yet; not checked: {', '.join(sorted(unchecked_runbooks))}")
    return alerts


def check_alert_tests(alerts):
    firing, quiet = set(), set()
    for path in sorted(glob.glob(os.path.join(ROOT, "dashboards/alerts/tests/*.yml"))):
        with open(path) as f:
            doc = yaml.safe_load(f)
        for test in doc.get("tests", []):
            for case in test.get("alert_rule_test", []) or []:
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    for name, where in sorted(alerts.items()):
        if name not in firing:
            fail(f"{where}: no test expects it to fire")
        if name not in quiet:
            fail(f"{where}: no test expects it not to fire")
    for name in sorted((firing | quiet) - set(alerts)):
        fail(f"tests name an alert no rule defines: {name}")


def check_dashboards(exported):
    uids = {}
    panel_rules = []
    for path in sorted(glob.glob(os.path.join(ROOT, "dashboards/grafana/*.json"))):
        base = os.path.basename(path)
        with open(path) as f:
            board = json.load(f)
        uid = board.get("uid")
        if not uid:
            fail(f"{base}: no uid")
        elif uid in uids:
            fail(f"{base}: uid {uid} also used by {uids[uid]}")
        uids[uid] = base
        variables = {v.get("name") for v in board.get("templating", {}).get("list", [])}
        if "DS_PROMETHEUS" not in variables:
            fail(f"{base}: no DS_PROMETHEUS data source variable")
        for panel in dashboard_panels(board):
            title = f"{base}: panel {panel.get('id')} {panel.get('title')!r}"
            if panel.get("type") == "row":
                continue
            if panel.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                fail(f"{title}: data source is not ${{DS_PROMETHEUS}}")
            targets = panel.get("targets") or []
            if not targets:
                fail(f"{title}: no targets")
            for target in targets:
                expr = (target.get("expr") or "").strip()
                if not expr:
                    fail(f"{title}: target {target.get('refId')} has no expr")
                    continue
                for metric in metric_names(expr):
                    if not known(metric, exported):
                        fail(f"{title}: reads {metric}, which neither the node nor node_exporter exports")
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                if "$" in expr:
                    fail(f"{title}: expression uses a variable this check cannot replace: {expr}")
                    continue
                panel_rules.append({"record": f"panel:{base[:-5].replace('-', '_')}:{panel.get('id')}_{target.get('refId')}",
                                    "expr": expr})
    if not uids:
        fail("no dashboards in dashboards/grafana")
    with open(PANEL_RULES_OUT, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-panels", "rules": panel_rules}]}, f, sort_keys=False)
    return len(panel_rules)


def main():
    global ROOT, PANEL_RULES_OUT
    ROOT, PANEL_RULES_OUT = sys.argv[1], sys.argv[2]
    exported = exported_metrics()
    if not exported:
        fail("found no metric names in node/src")
    alerts = check_rules(exported)
    check_alert_tests(alerts)
    expressions = check_dashboards(exported)
    for message in failures:
        print(f"FAIL {message}")
    print(f"{len(alerts)} alerts, {expressions} panel expressions, {len(exported)} metric names exported by the node: "
          f"{'ok' if not failures else f'{len(failures)} failure(s)'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
