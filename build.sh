#!/usr/bin/env bash
# ehrgate's one entry point.
#
#   ./build.sh run     build, then start policyd + sandbox EHR + stock nginx with the module
#   ./build.sh test    build, then unit tests (also under ASan+UBSan) and integration tests
#   ./build.sh build   install missing packages and build only
#   ./build.sh bench   benchmarks (gateway vs bare nginx, policyd round trips)
#   ./build.sh format  apply .clang-format to the C++ sources
#
# Every command installs what is missing with apt-get first, so each works on a fresh Debian 12.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD_DIR=$ROOT/build
ASAN_BUILD_DIR=$ROOT/build-asan
RUN_DIR=$ROOT/run
PYTHON=/usr/bin/python3  # Debian's python, which has the python3-* test packages
JOBS=${EHRGATE_JOBS:-2}

PACKAGES=(
  nginx nginx-dev
  g++ cmake ninja-build pkg-config make clang-format
  libuv1-dev liblmdb-dev lmdb-utils libmsgpack-cxx-dev libyaml-cpp-dev libssl-dev openssl
  googletest libgtest-dev rapidjson-dev
  python3 python3-pytest python3-requests python3-jwt python3-cryptography python3-msgpack python3-yaml
  wrk curl procps
  rsyslog rsyslog-gnutls  # audit (issue 7): the syslog/TLS receiver in tests/integration/test_audit_syslog.py
)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing: ${missing[*]}"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the packaged nginx on port 80; ehrgate runs its own instances.
  if pgrep -x nginx >/dev/null && [[ -f /run/nginx.pid ]]; then
    "${sudo[@]}" /usr/sbin/nginx -s quit 2>/dev/null || true
  fi
}

cmake_build() {
  local dir=$1
  shift
  if [[ ! -f $dir/build.ninja ]]; then
    cmake -S "$ROOT" -B "$dir" -G Ninja "$@" >/dev/null
  fi
  cmake --build "$dir" -j "$JOBS"
}

build() {
  ensure_packages
  log "building (build/)"
  cmake_build "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo
}

check_layering() {
  # shared/ is plain C++: no nginx, no libuv. The module and the daemon depend on it, not back.
  if grep -rnE '#include *[<"](ngx_|uv\.h|uv/|lmdb\.h)' "$ROOT/shared"; then
    echo "layering: shared/ must not include nginx, libuv or LMDB headers" >&2
    return 1
  fi
}

check_format() {
  local files
  mapfile -t files < <(cd "$ROOT" && git ls-files '*.cpp' '*.hpp' 2>/dev/null || find shared policyd ngx_module tests -name '*.[ch]pp')
  ((${#files[@]} == 0)) && return 0
  (cd "$ROOT" && clang-format --dry-run --Werror "${files[@]}")
}

run_tests() {
  build
  log "static checks: layering, clang-format"
  check_layering
  check_format
  log "unit tests"
  ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS"
  log "unit tests under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)"
  cmake_build "$ASAN_BUILD_DIR" -DCMAKE_BUILD_TYPE=Debug -DEHRGATE_SANITIZE=ON -DEHRGATE_BUILD_MODULE=OFF
  # One process for the whole suite: starting the instrumented binary once per test (ctest's way)
  # costs more than the tests themselves.
  ASAN_OPTIONS=detect_leaks=1 "$ASAN_BUILD_DIR/bin/ehrgate_unit_tests" --gtest_brief=1
  log "integration tests (real nginx + module, real policyd, sandbox EHR)"
  cd "$ROOT"
  EHRGATE_BUILD_DIR=$BUILD_DIR "$PYTHON" -m pytest -q -p no:cacheprovider tests/sandbox_ehr tests/integration
}

run_stack() {
  build
  exec "$PYTHON" "$ROOT/tests/stack.py" run --build-dir "$BUILD_DIR" --run-dir "$RUN_DIR"
}

run_bench() {
  build
  exec "$PYTHON" "$ROOT/tests/bench/bench.py" --build-dir "$BUILD_DIR"
}

case "${1:-}" in
  build) build ;;
  test) run_tests ;;
  run) run_stack ;;
  bench) run_bench ;;
  deps) ensure_packages ;;
  format)
    ensure_packages
    cd "$ROOT" && git ls-files '*.cpp' '*.hpp' | xargs clang-format -i
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
