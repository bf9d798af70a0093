#!/usr/bin/env bash
# Install the system programs the tests drive, create .venv and install tinkerd with its test
# tools. Idempotent (what is present is not installed again); no model downloads.
set -euo pipefail
cd "$(dirname "$0")/.."

# The cluster tests start their own redis-server, the console tests drive Debian's chromium
# through chromedriver: without them those tests fail (they never skip). apt-get update only
# when an install without it fails (a fresh image has no package lists).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; }
  if ! command -v apt-get >/dev/null || { [ -n "$sudo" ] && ! command -v sudo >/dev/null; } \
      || ! { apt_install || { $sudo apt-get update -q && apt_install; }; }; then
    echo "setup.sh: could not install ${missing[*]}, which the tests need;" \
         "install them (Debian/Ubuntu: apt-get install ${missing[*]}), then run the tests" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel of torch 2.13.0 lies on this machine's disk; install it first so nothing
# pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# tinker-cookbook (tests/test_cookbook.py runs its recipes against tinkerd). Its metadata asks for
# tml-renderers>=0.4.1, which no package index has (it tokenizes only Inkling models, imported on
# use), so it goes in with --no-deps, after the dependencies its SL, RL and DPO recipes import.
.venv/bin/python -m pip install -q chz==0.4.0 datasets==5.2.0 blobfile==3.3.0 pillow==13.0.0 \
    cloudpickle==3.1.2 termcolor==3.3.0 pylatexenc==2.11
.venv/bin/python -m pip install -q --no-deps tinker-cookbook==0.6.1

# Older SDKs of the protobuf era, each in its own venv (.venv-sdk/<version>) from the package
# registry: tests/test_old_sdks.py runs tests/test_api_tinker.py with each against tinkerd.
while read -r version; do
  venv=.venv-sdk/$version
  have=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('tinker'))" \
      2>/dev/null || true)
  [ "$have" = "$version" ] && continue
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "tinker==$version" pytest pytest-timeout
done < scripts/old-sdks.txt
