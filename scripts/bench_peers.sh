#!/usr/bin/env bash
# Install the peers of the KV-cache benchmark (bench/kv_bench.py); `make bench` runs this first.
#
#   scripts/bench_peers.sh [redis|mooncake|lmcache ...]   (default: all three)
#
# Redis comes from Debian (apt-get; as root, or through passwordless sudo). Each peer's Python
# client lives in its own virtualenv under .bench-venvs/, never in the project's:
#   .bench-venvs/redis      redis-py + hiredis
#   .bench-venvs/mooncake   mooncake-transfer-engine-non-cuda (also ships mooncake_master and
#                           mooncake_client, the store process)
#   .bench-venvs/lmcache    lmcache 0.5.6 with --no-deps plus the few packages its lm server and
#                           lm:// connector import (its full dependency list pulls CUDA: cupy,
#                           cuda-python, nvtx, ...), on torch's CPU build when pip can find it.
# Safe to run again: a virtualenv whose stamp matches and whose imports work is left alone.
# Each peer's outcome goes to .bench-venvs/<name>.status: "ok ..." or the reason it failed, which
# the benchmark reports as "skipped: <reason>". A failed peer does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENVS=.bench-venvs
mkdir -p "$VENVS"
LOG="$VENVS/install.log"

REDIS_REQS=(redis==8.1.0 hiredis==3.5.0 "numpy>=2,<3")
MOONCAKE_REQS=(mooncake-transfer-engine-non-cuda==0.3.13.post1 "numpy>=2,<3")
LMCACHE_VERSION=0.5.6
LMCACHE_NUMPY="numpy==2.2.6"
TORCH_CPU="torch==2.13.0+cpu"
TORCH_ANY="torch==2.13.0"
# What lmcache.v1.server and lmcache.v1.storage_backend.connector.lm_connector import, with
# lmcache 0.5.6's own bounds where it sets them.
LMCACHE_DEPS=(numba sortedcontainers "prometheus_client>=0.18.0,<=0.24.1" py-cpuinfo psutil
  aiohttp requests cachetools pyyaml aiofile msgspec "pyzmq>=25.0.0" "transformers>=5.4"
  cryptography)

say() { echo "bench_peers: $*" >&2; }

# status NAME TEXT: record the outcome for the benchmark.
status() { printf '%s\n' "$2" >"$VENVS/$1.status"; say "$1: $2"; }

# run CMD...: run with output in the log; on failure leave its last line in $last_error.
last_error=""
run() {
  if "$@" >>"$LOG" 2>&1; then return 0; fi
  last_error="$(grep -v '^\s*$' "$LOG" | grep -iv '^warning' | tail -n 1)"
  return 1
}

# fresh_venv NAME STAMP: 0 when the venv is already up to date.
venv_current() { [ -x "$VENVS/$1/bin/python" ] && [ "$(cat "$VENVS/$1/.stamp" 2>/dev/null)" = "$2" ]; }

make_venv() {
  rm -rf "${VENVS:?}/$1"
  run "$PYTHON" -m venv "$VENVS/$1"
}

install_redis_server() {
  if command -v redis-server >/dev/null 2>&1; then
    status redis-server "ok $(redis-server --version | head -n 1)"
    return
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      status redis-server "redis-server not installed, and apt-get needs root or passwordless sudo"
      return
    fi
  fi
  if run $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server ||
    { run $sudo apt-get update -q && run $sudo env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q redis-server; }; then
    status redis-server "ok $(redis-server --version | head -n 1)"
  else
    status redis-server "apt-get install redis-server failed: $last_error"
  fi
}

install_redis() {
  install_redis_server
  local stamp="${REDIS_REQS[*]}"
  if venv_current redis "$stamp" && "$VENVS/redis/bin/python" -c 'import redis, hiredis' 2>/dev/null; then
    status redis "ok (up to date) $stamp"
    return
  fi
  if make_venv redis && run "$VENVS/redis/bin/pip" install -q "${REDIS_REQS[@]}" &&
    run "$VENVS/redis/bin/python" -c 'import redis, hiredis, numpy'; then
    echo "$stamp" >"$VENVS/redis/.stamp"
    status redis "ok $stamp"
  else
    status redis "pip install ${REDIS_REQS[*]} failed: $last_error"
  fi
}

install_mooncake() {
  local stamp="${MOONCAKE_REQS[*]}"
  local check='from mooncake.store import MooncakeDistributedStore'
  if venv_current mooncake "$stamp" && "$VENVS/mooncake/bin/python" -c "$check" 2>/dev/null; then
    status mooncake "ok (up to date) $stamp"
    return
  fi
  if make_venv mooncake && run "$VENVS/mooncake/bin/pip" install -q "${MOONCAKE_REQS[@]}" &&
    run "$VENVS/mooncake/bin/python" -c "$check" &&
    [ -x "$VENVS/mooncake/bin/mooncake_master" ] && [ -x "$VENVS/mooncake/bin/mooncake_client" ]; then
    echo "$stamp" >"$VENVS/mooncake/.stamp"
    status mooncake "ok $stamp"
  else
    status mooncake "pip install ${MOONCAKE_REQS[*]} failed: $last_error"
  fi
}

install_lmcache() {
  local stamp="lmcache==$LMCACHE_VERSION $LMCACHE_NUMPY ${LMCACHE_DEPS[*]}"
  local check='import lmcache.v1.server.__main__
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend'
  local py="$VENVS/lmcache/bin/python" pip="$VENVS/lmcache/bin/pip"
  if venv_current lmcache "$stamp" && "$py" -c "$check" >/dev/null 2>&1; then
    status lmcache "ok (up to date) lmcache==$LMCACHE_VERSION"
    return
  fi
  make_venv lmcache || { status lmcache "python -m venv failed: $last_error"; return; }
  # torch's CPU build is not on PyPI; take it where pip finds it (a local wheel, find-links),
  # else PyPI's torch (with its CUDA dependencies: several GB, but it runs on CPU).
  local torch=$TORCH_CPU
  if ! run "$pip" install -q "$TORCH_CPU" "$LMCACHE_NUMPY"; then
    torch=$TORCH_ANY
    run "$pip" install -q "$TORCH_ANY" "$LMCACHE_NUMPY" ||
      { status lmcache "pip install $TORCH_ANY failed: $last_error"; return; }
  fi
  if run "$pip" install -q --no-deps "lmcache==$LMCACHE_VERSION" &&
    run "$pip" install -q "$LMCACHE_NUMPY" "${LMCACHE_DEPS[@]}" &&
    run "$py" -c "$check"; then
    echo "$stamp" >"$VENVS/lmcache/.stamp"
    status lmcache "ok lmcache==$LMCACHE_VERSION (--no-deps) $torch"
  else
    status lmcache "lmcache==$LMCACHE_VERSION install failed: $last_error"
  fi
}

peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(redis mooncake lmcache)
for peer in "${peers[@]}"; do
  case "$peer" in
    redis | mooncake | lmcache) "install_$peer" ;;
    *) say "unknown peer $peer (redis, mooncake, lmcache)"; exit 2 ;;
  esac
done
exit 0
