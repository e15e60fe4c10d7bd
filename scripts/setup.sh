#!/usr/bin/env bash
# Installs StemeDB's build prerequisites where missing (Debian/Ubuntu): a C++ toolchain and
# libclang for RocksDB's bindings, and jeprof (libjemalloc-dev) to read the node's heap profiles;
# the real peers the tests start: nginx and HAProxy (deploy/ configs); and Prometheus with
# node_exporter and python3-yaml for dashboards/ (scripts/check-dashboards.sh); moto's S3 server
# (PyPI, in a virtualenv) for the backup tests; Debian's chromium and Playwright (PyPI, same
# virtualenv) for the dashboard's browser test.
# protoc is vendored by the build, so it is not needed here.
set -euo pipefail
# shellcheck source=lib/libclang.sh
. "$(dirname "$0")/lib/libclang.sh"
# shellcheck source=lib/moto.sh
. "$(dirname "$0")/lib/moto.sh"
# shellcheck source=lib/playwright.sh
. "$(dirname "$0")/lib/playwright.sh"
# shellcheck source=lib/schemathesis.sh
. "$(dirname "$0")/lib/schemathesis.sh"
missing=()
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
# Exactly the file bindgen loads: libclang-cpp.so (clang's C++ library) does not count.
find_libclang >/dev/null || missing+=(libclang-dev)
command -v jeprof >/dev/null 2>&1 || missing+=(libjemalloc-dev)
# The runbooks' tools (scripts/run-runbooks.py runs their commands).
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
# Installed packages, not commands on PATH: nginx and haproxy live in /usr/sbin, which a
# non-root PATH may lack.
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
installed nginx || missing+=(nginx)
installed haproxy || missing+=(haproxy)
# promtool (package prometheus) checks and unit-tests the alert rules, and the same package's
# server is the real Prometheus a live-cluster test scrapes with; node_exporter serves the host
# metrics (memory, swap, disk space, inodes) the rules read where the runbooks mean the host.
# Where systemd runs, Debian starts both as services on :9090 and :9100; tests start their own
# instances on other loopback ports. python3-yaml: check-dashboards reads the rule files.
installed prometheus || missing+=(prometheus)
installed prometheus-node-exporter || missing+=(prometheus-node-exporter)
installed python3-yaml || missing+=(python3-yaml)
# moto's S3 server (PyPI), which the backup tests start on loopback as a real S3 endpoint, lives
# in a virtualenv of Debian's python3 (pip may not install into the system's Python).
installed python3-venv || missing+=(python3-venv)
# The browser scripts/dashboard-test.py drives headless (through Playwright, below).
installed chromium || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# The virtualenv with moto's server: created, or completed, unless its server already imports.
MOTO_VENV="${MOTO_VENV:-$HOME/.cache/stemedb-venv}"
if ! moto_ready "$MOTO_VENV"; then
  echo "installing moto[server] into $MOTO_VENV"
  /usr/bin/python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5,<6'
  moto_ready "$MOTO_VENV" || { echo "setup: moto's server is not usable from $MOTO_VENV" >&2; exit 1; }
fi
# Playwright for Python in the same virtualenv: it drives the system chromium (no browser download).
if ! playwright_ready "$MOTO_VENV"; then
  echo "installing playwright into $MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check 'playwright>=1.40,<2'
  playwright_ready "$MOTO_VENV" || { echo "setup: playwright is not usable from $MOTO_VENV" >&2; exit 1; }
fi
# schemathesis in the same virtualenv: the contract tests of the served OpenAPI documents.
if ! schemathesis_ready "$MOTO_VENV"; then
  echo "installing schemathesis into $MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.3,<5'
  schemathesis_ready "$MOTO_VENV" || { echo "setup: schemathesis is not usable from $MOTO_VENV" >&2; exit 1; }
fi
find_libclang >/dev/null || { echo "setup: libclang (libclang.so*) still not found for RocksDB's bindings; set LIBCLANG_PATH" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
