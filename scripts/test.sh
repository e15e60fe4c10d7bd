#!/usr/bin/env bash
# The whole default test suite: the dashboards' alert rules and panels (promtool), formatting,
# unit, property, storage-suite and integration tests
# (including real-process durability tests), and the short smoke versions of the chaos run and
# the benchmarks. Long chaos runs and full benchmarks are separate commands.
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
