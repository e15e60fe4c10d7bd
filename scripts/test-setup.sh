#!/usr/bin/env bash
# Tests scripts/lib/libclang.sh, moto.sh, playwright.sh and schemathesis.sh, the detection setup.sh relies on, against
# fake directory trees:
# the machine CI runs on has libclang installed, so only a fake tree can show that a machine
# with clang's C++ library alone (libclang-cpp.so.N) is told to install libclang-dev.
set -euo pipefail
. "$(dirname "$0")/lib/libclang.sh"
fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unset LIBCLANG_PATH LD_LIBRARY_PATH LIBRARY_PATH

# expect found|missing TREE FILE...: a sysroot holding exactly FILEs.
expect() {
  local want=$1 name=$2 root="$tmp/$2" got
  shift 2
  mkdir -p "$root"
  for f in "$@"; do mkdir -p "$root/$(dirname "$f")"; : >"$root/$f"; done
  if STEMEDB_SYSROOT=$root find_libclang >/dev/null; then got=found; else got=missing; fi
  if [ "$got" = "$want" ]; then echo "ok   $name: $got"; else echo "FAIL $name: want $want, got $got"; fails=$((fails + 1)); fi
}

expect missing empty
expect missing cpp-only usr/lib/llvm-14/lib/libclang-cpp.so.14 usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
expect missing cpp-unversioned usr/lib/llvm-14/lib/libclang-cpp.so
expect missing other-lib usr/lib/x86_64-linux-gnu/libclangBasic.a usr/lib/libclang_rt.so
expect found   debian-dev usr/lib/llvm-14/lib/libclang-cpp.so.14 usr/lib/llvm-14/lib/libclang.so.1 usr/lib/x86_64-linux-gnu/libclang-14.so.14
expect found   unversioned usr/lib/libclang.so
expect found   dash-versioned usr/lib/x86_64-linux-gnu/libclang-14.so
expect found   dot-versioned usr/lib64/libclang.so.13
expect found   local-llvm usr/local/llvm16/lib/libclang-16.so.16
expect found   llvm-dot-versioned usr/lib/llvm-14/lib/libclang.so.1
expect missing too-deep usr/lib/a/b/c/libclang.so

# LIBCLANG_PATH is the only place searched when set, as in clang-sys.
mkdir -p "$tmp/env/good" "$tmp/env/bad"
: >"$tmp/env/good/libclang-14.so.1"
: >"$tmp/env/bad/libclang-cpp.so.14"
check_env() {
  local want=$1 value=$2 got
  if LIBCLANG_PATH=$value STEMEDB_SYSROOT="$tmp/debian-dev" find_libclang >/dev/null; then got=found; else got=missing; fi
  if [ "$got" = "$want" ]; then echo "ok   LIBCLANG_PATH=${value#"$tmp"/}: $got"; else echo "FAIL LIBCLANG_PATH=${value#"$tmp"/}: want $want, got $got"; fails=$((fails + 1)); fi
}
check_env found "$tmp/env/good"
check_env found "$tmp/env/good/libclang-14.so.1"
check_env missing "$tmp/env/bad"
check_env missing "$tmp/env/bad/libclang-cpp.so.14"

# LD_LIBRARY_PATH is searched before the system directories.
if LD_LIBRARY_PATH="/nonexistent:$tmp/env/good" STEMEDB_SYSROOT="$tmp/empty" find_libclang >/dev/null; then
  echo "ok   LD_LIBRARY_PATH: found"
else
  echo "FAIL LD_LIBRARY_PATH: want found"; fails=$((fails + 1))
fi

# moto's virtualenv (lib/moto.sh): ready only with a python that imports moto's server.
. "$(dirname "$0")/lib/moto.sh"
fake_venv() {
  local name=$1 python_exit=$2 server=$3
  mkdir -p "$tmp/venv-$name/bin"
  printf '#!/bin/sh\nexit %s\n' "$python_exit" >"$tmp/venv-$name/bin/python"
  chmod +x "$tmp/venv-$name/bin/python"
  if [ "$server" = yes ]; then : >"$tmp/venv-$name/bin/moto_server"; chmod +x "$tmp/venv-$name/bin/moto_server"; fi
}
# expect_venv CHECK WANT NAME: whether CHECK (moto_ready, playwright_ready) finds the fake venv
# NAME ready.
expect_venv() {
  local check=$1 want=$2 name=$3 got
  if "$check" "$tmp/venv-$name"; then got=ready; else got=missing; fi
  if [ "$got" = "$want" ]; then echo "ok   $check $name: $got"; else echo "FAIL $check $name: want $want, got $got"; fails=$((fails + 1)); fi
}
fake_venv no-moto 1 yes
fake_venv no-server 0 no
fake_venv complete 0 yes
expect_venv moto_ready missing absent
expect_venv moto_ready missing no-moto
expect_venv moto_ready missing no-server
expect_venv moto_ready ready complete

# Playwright in the virtualenv (lib/playwright.sh): ready only with a python that imports it.
. "$(dirname "$0")/lib/playwright.sh"
fake_venv pw-broken 1 no
fake_venv pw-complete 0 no
expect_venv playwright_ready missing absent
expect_venv playwright_ready missing pw-broken
expect_venv playwright_ready ready pw-complete

# schemathesis in the virtualenv (lib/schemathesis.sh): ready only with a python that imports it
# and its command installed.
. "$(dirname "$0")/lib/schemathesis.sh"
fake_venv st-broken 1 no
: >"$tmp/venv-st-broken/bin/schemathesis"; chmod +x "$tmp/venv-st-broken/bin/schemathesis"
fake_venv st-no-command 0 no
fake_venv st-complete 0 no
: >"$tmp/venv-st-complete/bin/schemathesis"; chmod +x "$tmp/venv-st-complete/bin/schemathesis"
expect_venv schemathesis_ready missing absent
expect_venv schemathesis_ready missing st-broken
expect_venv schemathesis_ready missing st-no-command
expect_venv schemathesis_ready ready st-complete

[ "$fails" -eq 0 ] || { echo "$fails set-up detection case(s) failed" >&2; exit 1; }
