#!/usr/bin/env bash
# Create the project's virtual environment with everything the operator, trainer and tests need.
# pip's own cache (~/.cache/pip) makes a second run fast.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
# DeepSpeed ships only an sdist whose setup imports torch: install torch first, then build
# DeepSpeed without isolation and without pre-compiled ops (they are JIT-built when used).
"$venv/bin/python" -m pip install --quiet "torch==2.15.0"
DS_BUILD_OPS=0 "$venv/bin/python" -m pip install --quiet --no-build-isolation "deepspeed==0.19.8"
"$venv/bin/python" -m pip install --quiet -e ".[trainer,dev]"
