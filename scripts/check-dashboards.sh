#!/usr/bin/env bash
# Checks dashboards/ without a cluster: the alert rules parse (promtool check rules) and pass
# their unit tests (promtool test rules), every Grafana dashboard is valid JSON whose panel
# targets all have an expression that parses as PromQL, and every metric read by a rule or a
# panel is one the node (or node_exporter, for host metrics) exports. Exits non-zero on any
# failure. Needs promtool (Debian's prometheus, installed by scripts/setup.sh) and python3-yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v promtool >/dev/null 2>&1 || { echo "promtool not found: run scripts/setup.sh (Debian package prometheus)" >&2; exit 1; }
fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

step() {
  local name=$1
  shift
  if "$@" >"$tmp/out" 2>&1; then
    echo "ok   $name"
  else
    echo "FAIL $name"
    sed 's/^/     /' "$tmp/out"
    fails=$((fails + 1))
  fi
}

step "promtool check rules dashboards/alerts/*.yml" promtool check rules dashboards/alerts/*.yml
step "promtool test rules dashboards/alerts/tests/*.yml" promtool test rules dashboards/alerts/tests/*.yml
for f in dashboards/grafana/*.json; do
  step "json $f" python3 -m json.tool "$f"
done
# Panels, metric names, rule annotations and test coverage; writes the panel expressions as
# recording rules so that promtool parses them.
python3 scripts/lib/check_dashboards.py . "$tmp/panels.yml" || fails=$((fails + 1))
if [ -s "$tmp/panels.yml" ]; then
  step "promtool parses every panel expression" promtool check rules "$tmp/panels.yml"
fi

[ "$fails" -eq 0 ] || { echo "check-dashboards: $fails check(s) failed" >&2; exit 1; }
echo "check-dashboards: all checks passed"
