#!/usr/bin/env bash
# The whole default test suite: the dashboards' alert rules and panels (promtool), formatting,
# unit, property, storage-suite and integration tests
# (including real-process durability tests), the short smoke versions of the chaos run and
# the benchmarks, the runbooks' commands against a live cluster (scripts/run-runbooks.py), and
# the load-balancer configs through a node kill (scripts/lb-test.py), and every dashboard
# panel and alert rule evaluated by a real Prometheus (scripts/prometheus-live-test.py), the
# served OpenAPI documents fuzzed by schemathesis (scripts/contract-test.py), and the web
# dashboard in a real browser (scripts/dashboard-test.py).
# Long chaos runs and full benchmarks are separate commands.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo's own default (./target) unless the caller chose one: the README's `cargo run --release`
# builds there too, so RocksDB is compiled once for both.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
./scripts/setup.sh
./scripts/test-setup.sh
./scripts/check-dashboards.sh
cargo fmt --all -- --check
# The release profile, as `cargo run --release` in the README: one RocksDB build serves both.
cargo build --release --workspace --all-targets --locked
cargo test --release --workspace --locked -- --test-threads 2
# Every shell command of runbooks/, against live 3-node clusters of the release binary built above.
STEMEDB_BIN="$CARGO_TARGET_DIR/release/stemedb" python3 scripts/run-runbooks.py
# The shipped nginx and HAProxy configs in front of live 3-node clusters, through a node kill.
STEMEDB_BIN="$CARGO_TARGET_DIR/release/stemedb" python3 scripts/lb-test.py
# Every dashboard panel and alert rule expression through a real Prometheus scraping a live 3-node cluster under load.
STEMEDB_BIN="$CARGO_TARGET_DIR/release/stemedb" python3 scripts/prometheus-live-test.py
# The served OpenAPI documents (18180, 18181) fuzzed by schemathesis against a live node (short run; --long is separate).
STEMEDB_BIN="$CARGO_TARGET_DIR/release/stemedb" "${MOTO_VENV:-$HOME/.cache/stemedb-venv}/bin/python" scripts/contract-test.py
# The web dashboard (18188) in headless Chromium against a live 3-node cluster; screenshots in target/dashboard-artifacts.
STEMEDB_BIN="$CARGO_TARGET_DIR/release/stemedb" "${MOTO_VENV:-$HOME/.cache/stemedb-venv}/bin/python" scripts/dashboard-test.py
