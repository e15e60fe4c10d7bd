# schemathesis_ready VENV: whether the virtualenv VENV can run scripts/contract-test.py: its
# python imports schemathesis and the package's command-line entry point is installed.
schemathesis_ready() {
  local venv=$1
  [ -x "$venv/bin/python" ] && [ -x "$venv/bin/schemathesis" ] \
    && "$venv/bin/python" -c 'import schemathesis' >/dev/null 2>&1
}
