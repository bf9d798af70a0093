#!/usr/bin/env bash
# Create .venv and install tinkerd with its test tools. Idempotent; no model downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
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
