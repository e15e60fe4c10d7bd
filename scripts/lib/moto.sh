# moto_ready VENV: whether the virtualenv VENV holds moto's S3 server (moto[server], which the
# backup tests start on loopback): its python imports moto's server and flask_cors, which only
# the [server] extra installs. A venv without it, or a half-made one, is not ready.
moto_ready() {
  local venv=$1
  [ -x "$venv/bin/python" ] && [ -x "$venv/bin/moto_server" ] &&
    "$venv/bin/python" -c 'import moto.server, flask_cors' >/dev/null 2>&1
}
