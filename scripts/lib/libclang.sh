# Finds the libclang that RocksDB's bindings (bindgen through clang-sys 1.9, with the `runtime`
# feature) would load, by the same rules: only $LIBCLANG_PATH when it is set; otherwise
# `llvm-config --prefix`/{bin,lib,lib64}, $LD_LIBRARY_PATH, $LIBRARY_PATH, then the Linux
# directory globs below. File names libclang.so, libclang-*.so, libclang.so.*, libclang-*.so.*,
# but never libclang-cpp (clang's C++ library, which clang-sys skips: it is not libclang).
#
# Sourced by scripts/setup.sh and tested by scripts/test-setup.sh, which points STEMEDB_SYSROOT
# at a fake tree. Prints the first match and returns 0, or returns 1.

libclang_matches_in() {
  local dir=$1 f name
  [ -d "$dir" ] || return 1
  for f in "$dir"/libclang.so "$dir"/libclang-*.so "$dir"/libclang.so.* "$dir"/libclang-*.so.*; do
    [ -e "$f" ] || continue
    name=${f##*/}
    case $name in *-cpp.*) continue ;; esac
    echo "$f"
    return 0
  done
  return 1
}

find_libclang() {
  local root=${STEMEDB_SYSROOT:-} dir pattern prefix
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    if [ -f "$LIBCLANG_PATH" ]; then
      libclang_matches_in "$(dirname "$LIBCLANG_PATH")" >/dev/null && {
        case ${LIBCLANG_PATH##*/} in
          *-cpp.*) return 1 ;;
          libclang.so|libclang-*.so|libclang.so.*|libclang-*.so.*) echo "$LIBCLANG_PATH"; return 0 ;;
        esac
      }
      return 1
    fi
    libclang_matches_in "$LIBCLANG_PATH"
    return
  fi
  if [ -z "$root" ] && command -v llvm-config >/dev/null 2>&1; then
    prefix=$(llvm-config --prefix 2>/dev/null | head -n1)
    for dir in "$prefix/bin" "$prefix/lib" "$prefix/lib64"; do
      libclang_matches_in "$dir" && return 0
    done
  fi
  local IFS_saved=$IFS
  IFS=:
  for dir in ${LD_LIBRARY_PATH:-} ${LIBRARY_PATH:-}; do
    IFS=$IFS_saved
    [ -n "$dir" ] && libclang_matches_in "$dir" && return 0
    IFS=:
  done
  IFS=$IFS_saved
  for pattern in "/usr/local/llvm*/lib*" "/usr/local/lib*/*/*" "/usr/local/lib*/*" "/usr/local/lib*" \
                 "/usr/lib*/*/*" "/usr/lib*/*" "/usr/lib*"; do
    for dir in $root$pattern; do
      libclang_matches_in "$dir" && return 0
    done
  done
  return 1
}
