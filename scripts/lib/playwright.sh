# playwright_ready VENV: whether the virtualenv VENV can drive a browser for
# scripts/dashboard-test.py: its python imports Playwright's sync API (the package brings its own
# driver; the browser is Debian's chromium, so nothing else is downloaded).
playwright_ready() {
  local venv=$1
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import playwright.sync_api' >/dev/null 2>&1
}
