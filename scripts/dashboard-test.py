#!/usr/bin/env python3
"""The web dashboard (port 18188) in a real browser against a live 3-node cluster.

Starts three `stemedb` processes on loopback (the cluster set-up of scripts/run-runbooks.py:
127.0.0.1-3, or the first free 127.0.N.1-3; an admin token; circuit breakers in quarantine
mode), quarantines claims by tripping an agent's breaker and writing as it, then drives Debian's
Chromium headless through Playwright (the system browser: nothing is downloaded) over node 1's
dashboard and checks that:

- the overview lists the three members and the shards;
- the quarantine panel shows the quarantined claims within 2 s of opening it (the runbooks'
  promise), filters them by agent and by concept prefix, and pages through more than a page;
- release and reject through the panel's buttons change the claims' status in the API
  (`GET /v1/assertions/{id}`: `active`, `retracted`);
- a breaker tripped through the API shows up open; one tripped through the page's form is open
  in the API; a reset through the page closes it in the API;
- every page renders without an error banner, and the browser logged no console error and no
  page error anywhere.

A screenshot of every page is saved in the artifact directory (--artifacts, else
$DASHBOARD_ARTIFACTS, else target/dashboard-artifacts). The panel's load time is printed.

Usage: scripts/dashboard-test.py [--keep] [--bin PATH] [--hosts A,B,C,D] [--artifacts DIR]
Binary: --bin, $STEMEDB_BIN, $CARGO_TARGET_DIR/release/stemedb, or ./target/release/stemedb.
Needs Playwright for Python (scripts/setup.sh installs it in its virtualenv) and /usr/bin/chromium.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse

from playwright.sync_api import sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("run_runbooks", os.path.join(ROOT, "scripts", "run-runbooks.py"))
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)

CHROMIUM = "/usr/bin/chromium"
DASHBOARD_PORT = 18188
PANEL_DEADLINE_MS = 2000  # the runbooks: "the quarantine panel should load in under 2 seconds"
PAGES = ["overview", "shards", "shard/0", "quarantine", "breakers", "slow-queries", "anti-entropy", "backups"]


def api(ip, method, path, body=None, admin=True):
    return rb.http(method, f"http://{ip}:{rb.PORTS['api']}{path}", body, token=rb.TOKEN if admin else None, timeout=10)


def write_as(ip, agent, path, value):
    status, body = api(ip, "POST", "/v1/assert",
                       {"concept_path": path, "predicate": "state", "value": value, "agent_id": agent}, admin=False)
    if status != 201:
        raise RuntimeError(f"write of {path} as {agent}: {status} {body}")
    return body


def status_of(ip, claim_id):
    status, body = api(ip, "GET", f"/v1/assertions/{claim_id}", admin=False)
    if status != 200:
        raise RuntimeError(f"GET /v1/assertions/{claim_id}: {status} {body}")
    return body["status"]


def awaiting(ip, count):
    """(whether `count` claims await a decision, how many do): a rb.wait_until check."""
    listed = len(quarantined(ip))
    return listed == count, listed


def quarantined(ip, **params):
    query = urllib.parse.urlencode(dict(params, limit=1000))
    status, body = api(ip, "GET", f"/v1/admin/quarantine?{query}")
    if status != 200:
        raise RuntimeError(f"quarantine list: {status} {body}")
    return [c["id"] for c in body["quarantined"]]


class Browser:
    """One headless Chromium page that records console errors and page errors."""

    def __init__(self, playwright, artifacts):
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors = []
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.artifacts = artifacts

    def open(self, base, name):
        self.page.goto(f"{base}/#{name}")
        self.page.wait_for_selector(f"#page-{name.split('/')[0]}", timeout=10_000)

    def shot(self, name):
        path = os.path.join(self.artifacts, name.replace("/", "-") + ".png")
        self.page.screenshot(path=path, full_page=True)
        return path

    def banner(self):
        node = self.page.locator("#banner")
        return node.text_content() if node.is_visible() else None

    def close(self):
        self.browser.close()


def run(binary, ips, root, artifacts):
    services = rb.Services(root, binary)
    cluster = rb.Cluster(root, binary, ips, services)
    cluster.prepare()
    for ip in ips[:3]:
        with open(cluster.host(ip)["env"]["ENV_FILE"], "a") as f:
            f.write("STEMEDB_CIRCUIT_BREAKER_MODE=quarantine\n")
    report = {}
    try:
        cluster.start()
        ip = ips[0]
        base = f"http://{ip}:{DASHBOARD_PORT}"
        rb.wait_until("the dashboard", lambda: (rb.http("GET", f"{base}/session")[0] == 200, None), 20)

        # Quarantined claims: the breaker of suspect-bot, then three writes as it.
        status, body = api(ip, "POST", "/v1/admin/circuit-breaker/trip", {"agent_id": "suspect-bot", "reason": "dashboard test"})
        assert status == 200, (status, body)
        claims = [write_as(ips[i % 3], "suspect-bot", path, i)["id"]
                  for i, path in enumerate(["dash/a/one", "dash/a/two", "dash/b/three"])]
        rb.wait_until("three quarantined claims", lambda: awaiting(ip, 3), 20)

        with sync_playwright() as playwright:
            browser = Browser(playwright, artifacts)
            page = browser.page
            try:
                # Overview without a token: cluster status is readable, members and shards listed.
                browser.open(base, "overview")
                page.wait_for_function("document.querySelectorAll('#page-overview section')[1]?.querySelectorAll('tbody tr').length === 3",
                                       timeout=10_000)
                browser.shot("overview")

                # The admin token, through the page's form.
                page.fill("#token", rb.TOKEN)
                page.click("#token-save")

                # The quarantine panel: shows the three claims within 2 s of opening.
                started = time.monotonic()
                page.goto(f"{base}/#quarantine")
                page.wait_for_selector('#quarantine-list[data-count="3"]', timeout=PANEL_DEADLINE_MS)
                report["quarantine_panel_ms"] = round((time.monotonic() - started) * 1000, 1)
                report["quarantine_list_ms"] = int(page.get_attribute("#quarantine-list", "data-loaded-ms"))
                for claim in claims:
                    assert page.locator(f'button[data-action="release"][data-id="{claim}"]').count() == 1, claim
                browser.shot("quarantine")

                # Filters: by concept prefix, by agent.
                page.fill("#q-prefix", "dash/a")
                page.click("#q-filters button[type=submit]")
                page.wait_for_selector('#quarantine-list[data-count="2"]', timeout=5000)
                page.fill("#q-prefix", "")
                page.fill("#q-agent", "someone-else")
                page.click("#q-filters button[type=submit]")
                page.wait_for_selector('#quarantine-list[data-count="0"]', timeout=5000)
                page.fill("#q-agent", "suspect-bot")
                page.click("#q-filters button[type=submit]")
                page.wait_for_selector('#quarantine-list[data-count="3"]', timeout=5000)

                # Release the first claim and reject the second through the buttons.
                for claim, decision, expected in [(claims[0], "release", "active"), (claims[1], "reject", "retracted")]:
                    page.once("dialog", lambda dialog: dialog.accept("checked by the dashboard test"))
                    page.click(f'button[data-action="{decision}"][data-id="{claim}"]')
                    page.wait_for_selector(f'#quarantine-list[data-count="{2 if decision == "release" else 1}"]', timeout=10_000)
                    got = rb.wait_until(f"{claim} {expected} in the API",
                                        lambda: (status_of(ips[1], claim) == expected, status_of(ips[1], claim)), 10)
                    report[{"release": "released", "reject": "rejected"}[decision]] = got
                assert quarantined(ip) == [claims[2]], quarantined(ip)

                # Paging: 60 more quarantined claims make two pages of 50.
                items = [{"concept_path": f"dash/page/{i}", "predicate": "state", "value": i, "agent_id": "suspect-bot"}
                         for i in range(60)]
                status, body = api(ip, "POST", "/v1/assert/batch", {"assertions": items}, admin=False)
                assert status in (200, 201, 207), (status, body)
                rb.wait_until("61 quarantined claims", lambda: awaiting(ip, 61), 20)
                page.click("#q-refresh")
                page.wait_for_selector('#quarantine-list[data-count="50"]', timeout=5000)
                page.click("#q-next")
                page.wait_for_selector('#quarantine-list[data-count="11"]', timeout=5000)
                browser.shot("quarantine-page-2")
                page.click("#q-prev")
                page.wait_for_selector('#quarantine-list[data-count="50"]', timeout=5000)

                # Breakers: one tripped through the API shows up open.
                status, body = api(ip, "POST", "/v1/admin/circuit-breaker/trip", {"agent_id": "api-tripped", "reason": "from the API"})
                assert status == 200, (status, body)
                browser.open(base, "breakers")
                page.wait_for_selector("#breaker-list tr:has-text('api-tripped') .badge.open", timeout=10_000)
                # One tripped through the form is open in the API; reset through the page, closed.
                page.fill("#b-agent", "ui-tripped")
                page.fill("#b-reason", "from the dashboard")
                page.click("#b-trip button[type=submit]")
                page.wait_for_selector("#breaker-list tr:has-text('ui-tripped') .badge.open", timeout=10_000)
                status, body = api(ips[2], "GET", "/v1/admin/circuit-breaker?agent_id=ui-tripped&state=all")
                assert status == 200 and body["breakers"][0]["state"] == "open", body
                page.click('button[data-reset="ui-tripped"]')
                page.wait_for_selector("#breaker-list tr:has-text('ui-tripped') .badge.closed", timeout=10_000)
                rb.wait_until("ui-tripped closed in the API", lambda: (
                    api(ips[2], "GET", "/v1/admin/circuit-breaker?agent_id=ui-tripped&state=all")[1]["breakers"][0]["state"] == "closed",
                    None), 10)
                browser.shot("breakers")

                # Every page renders, without an error banner.
                for name in PAGES:
                    browser.open(base, name)
                    page.wait_for_timeout(300)
                    banner = browser.banner()
                    assert not banner, f"#{name} shows an error: {banner}"
                    browser.shot(name)
                assert not browser.errors, "the browser logged errors:\n" + "\n".join(browser.errors)
            finally:
                browser.close()
        report["screenshots"] = sorted(os.listdir(artifacts))
        return report
    finally:
        services.stop_all()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data dirs, logs)")
    parser.add_argument("--bin", help="the stemedb binary")
    parser.add_argument("--hosts", help="four loopback addresses, comma separated (as run-runbooks.py)")
    parser.add_argument("--artifacts", help="where the screenshots go")
    args = parser.parse_args()
    if not os.access(CHROMIUM, os.X_OK):
        print(f"dashboard-test: {CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)", file=sys.stderr)
        return 1
    artifacts = args.artifacts or os.environ.get("DASHBOARD_ARTIFACTS") or os.path.join(ROOT, "target", "dashboard-artifacts")
    shutil.rmtree(artifacts, ignore_errors=True)
    os.makedirs(artifacts)
    binary = rb.find_binary(args.bin)
    root = tempfile.mkdtemp(prefix="dashboard-test.")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    rc = 0
    try:
        ips = rb.pick_hosts(args.hosts.split(",") if args.hosts else None)
        print(f"dashboard-test: cluster on {', '.join(ips[:3])}, binary {binary}", flush=True)
        report = run(binary, ips, root, artifacts)
        print("dashboard-test: " + json.dumps(report), flush=True)
        print(f"dashboard-test: passed; the quarantine panel showed its claims {report['quarantine_panel_ms']} ms after "
              f"opening (its list answered in {report['quarantine_list_ms']} ms); screenshots in {artifacts}")
    except KeyboardInterrupt:
        print("dashboard-test: interrupted", file=sys.stderr)
        rc = 130
    except Exception as e:  # noqa: BLE001 - the test's verdict
        print(f"dashboard-test: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        for name in sorted(os.listdir(os.path.join(root, "hosts"))) if os.path.isdir(os.path.join(root, "hosts")) else []:
            print(f"--- {name}: {rb.tail(os.path.join(root, 'hosts', name, 'stemedb.log'))}", file=sys.stderr)
        rc = 1
    finally:
        if args.keep:
            print(f"dashboard-test: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
