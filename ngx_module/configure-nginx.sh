#!/usr/bin/env bash
# Runs Debian's nginx configure (the exact flags of the stock /usr/sbin/nginx, --with-compat
# included) to generate, under OUT_DIR, the module registration file and ngx_auto_config.h that
# our module must be compiled against. Nothing is written under /usr/share/nginx/src.
set -euo pipefail
out_dir=$1
module_dir=$2
src=/usr/share/nginx/src
if [[ ! -x $src/configure ]]; then
  echo "configure-nginx.sh: $src/configure not found; install nginx-dev" >&2
  exit 1
fi
cd "$src"
# shellcheck disable=SC1091
. ./conf_flags
./configure \
  --with-cc-opt="$(dpkg-buildflags --get CFLAGS) -fPIC $(dpkg-buildflags --get CPPFLAGS)" \
  --with-ld-opt="$(dpkg-buildflags --get LDFLAGS) -fPIC" \
  "${NGX_CONF_FLAGS[@]}" \
  --add-dynamic-module="$module_dir" \
  --builddir="$out_dir" > "$out_dir.configure.log" 2>&1 || {
    echo "configure-nginx.sh: nginx configure failed; see $out_dir.configure.log" >&2
    exit 1
  }
