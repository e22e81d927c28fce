#!/usr/bin/env bash
# Set up kvtier on a fresh Debian machine with Python 3.11, then run it or test it.
#
#   scripts/bootstrap.sh up      install everything, then run the dev cluster (Ctrl-C stops it)
#   scripts/bootstrap.sh test    install everything, then lint, type-check and run the test suite
#   scripts/bootstrap.sh install install everything and stop
#
# Installs etcd (Debian's etcd-server), make and ISA-L (libisal2) with apt when they are missing
# (for `test` also redis-server and chromium),
# creates .venv and installs kvtier with its dev tools into it (through uv where it can be had,
# pip otherwise). Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in
  up | test | install) shift ;;
  *) echo "usage: scripts/bootstrap.sh up|test|install [args for kvtier up]" >&2; exit 2 ;;
esac

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "kvtier needs Python >= 3.11 as python3" >&2
  exit 1
}

packages=()
command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
command -v make >/dev/null 2>&1 || packages+=(make)
if [ "$mode" = test ]; then  # the end-to-end proof compares against Redis
  command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
  # The console's browser test drives headless Chromium (tests/integration/test_console.py).
  command -v chromium >/dev/null 2>&1 || packages+=(chromium)
  # docker-compose.yml run for real (tests/compose): Debian's Docker engine and compose, and
  # debootstrap for the registry-free base image (scripts/compose_base_image.sh).
  command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || packages+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
    || packages+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || packages+=(debootstrap)
fi
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || packages+=(python3-venv)
# ISA-L for erasure coding: checked the way kvtier.erasure loads it (ldconfig is not on a
# non-root user's PATH on Debian).
python3 -c 'import ctypes; ctypes.CDLL("libisal.so.2")' >/dev/null 2>&1 || packages+=(libisal2)
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing with apt: ${packages[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${packages[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# For `test`, the two engines kept apart from .venv (LMCache's own virtualenv, vLLM's wheel in
# .engines/) download and install in the background while .venv is set up, linted and
# type-checked: they are large, mostly network time, and only their tests need them.
background=()
bg_logs=""
if [ "$mode" = test ]; then
  bg_logs=$(mktemp -d)
  # The compose test's Docker engine and images (tests/compose/prebuild.py; standard library
  # only, so it starts before .venv exists). Best effort: the test builds what is missing.
  python3 -m tests.compose.prebuild "$bg_logs/compose" >"$bg_logs/compose.log" 2>&1 &
  background+=($!)
  # LMCache in a virtualenv of its own (its pins clash with ours), so that the LMCache plugin
  # is tested with LMCache's own code (tests/integrations/test_lmcache_engine.py).
  (PYTHON=python3 scripts/bench_peers.sh lmcache || echo "bootstrap: LMCache could not be installed" >&2) \
    >"$bg_logs/lmcache.log" 2>&1 &
  background+=($!)
  # vLLM 0.33's own offloading classes for the vLLM plugin's tests: the wheel without its CUDA
  # dependencies, plus the pure-Python modules vllm.v1.kv_offload imports, kept in .engines/.
  if [ ! -d .engines/vllm/vllm ]; then
    (.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .engines/vllm \
      vllm==0.33.0 msgspec psutil pyzmq cbor2 requests openai openai-harmony sniffio pybase64 \
      cachetools cloudpickle py-cpuinfo xgrammar apache-tvm-ffi llguidance fastapi starlette \
      partial-json-parser opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions \
      opentelemetry-semantic-conventions-ai || echo "bootstrap: vLLM could not be installed" >&2) \
      >"$bg_logs/vllm.log" 2>&1 &
    background+=($!)
  fi
fi
wait_background() {
  for pid in "${background[@]}"; do wait "$pid" || true; done
  if [ -n "$bg_logs" ]; then
    cat "$bg_logs"/*.log 2>/dev/null || true
  fi
}
# After the tests: stop the dockerd the prebuild started (the compose test leaves an engine it
# did not start running).
stop_background() {
  [ -n "$bg_logs" ] || return 0
  local pid
  pid=$(cat "$bg_logs/compose/dockerd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -rf "$bg_logs"
}

# Installs into .venv go through uv (a pinned release, installed with pip) where it can be had,
# and through pip where it cannot or where uv fails: on a clean 2-core machine, the three
# installs of `test` took pip 3.5 minutes and uv 25 s (parallel downloads, no per-file Python
# work), the same packages. uv reads none of pip's configuration, so what pip is configured
# with here (pip.conf, PIP_* variables: find-links with a local CPU build of torch,
# constraints, indexes) is handed to it. KVTIER_BOOTSTRAP_PIP=1: pip only.
UV_VERSION=0.13.8
uv_args=()
uv_ok=0
# pip's settings as uv flags, one a line; uv is used only when they could be read (without the
# find-links, uv would take torch's CUDA build, gigabytes, from the index).
if [ "${KVTIER_BOOTSTRAP_PIP:-}" != 1 ] \
  && { [[ "$(.venv/bin/uv --version 2>/dev/null)" == "uv $UV_VERSION "* ]] \
       || .venv/bin/python -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >/dev/null 2>&1; } \
  && uv_config=$(.venv/bin/python - <<'PY'
import ast, subprocess, sys

# `pip config list`: "section.name='value'" per line; pip's own precedence: its environment
# variables over the [install] section over [global].
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                        capture_output=True, text=True, check=True).stdout
rank = {":env:": 2, "install": 1, "global": 0}
found: dict[str, tuple[int, str]] = {}
for line in listed.splitlines():
    key, sep, value = line.partition("=")
    section, _, name = key.rpartition(".")
    if sep and section in rank and rank[section] >= found.get(name, (-1, ""))[0]:
        found[name] = (rank[section], str(ast.literal_eval(value)))
for name in ("index-url", "extra-index-url", "find-links", "constraint"):
    for value in found.get(name, (0, ""))[1].split():
        print(f"--{name}", value, sep="\n")
if found.get("no-index", (0, ""))[1].lower() in ("1", "true", "yes", "on"):
    print("--no-index")
PY
); then
  [ -z "$uv_config" ] || mapfile -t uv_args <<<"$uv_config"
  uv_ok=1
fi
venv_install() {
  if [ "$uv_ok" = 1 ]; then
    # unsafe-best-match: the best version over every index, as pip picks (uv's default takes
    # a package from the first index that has it, which here is a partial local mirror).
    .venv/bin/uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match \
      "${uv_args[@]}" "$@" && return 0
    echo "bootstrap: uv could not install $*; trying pip" >&2
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@"
}

# For `test` also the end-to-end proof's model (torch CPU, transformers) and Redis client for
# tests/e2e, in the same install (one resolution and one build of kvtier, not two).
extras=dev
[ "$mode" != test ] || extras=dev,e2e
venv_install -e ".[$extras]"
if [ "$mode" = test ]; then
  # NIXL's OBJ plugin, for the S3 acceptance tests: CPU-only, without its CUDA dependencies.
  venv_install --no-deps 'nixl==1.5.*' 'nixl-cu12==1.5.*'
fi

case "$mode" in
  up) exec .venv/bin/kvtier up --state-dir "${KVTIER_STATE_DIR:-.kvtier}" "$@" ;;
  test)
    # `make check`, with the background installs finished before the tests that need them.
    # Lint and mypy side by side (-O: each one's output in one piece): mypy takes one core.
    make -j2 -O lint typecheck VENV=.venv || { wait_background; stop_background; exit 1; }
    wait_background
    rc=0
    make test VENV=.venv || rc=$?
    stop_background
    exit "$rc" ;;
  install) echo "installed: .venv/bin/kvtier, etcd at $(command -v etcd)" ;;
esac
