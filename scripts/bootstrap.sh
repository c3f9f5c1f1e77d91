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
# DeepSpeed without isolation. Its CPU backend's one op (shm_comm, loaded by every ZeRO process on
# DS_ACCELERATOR=cpu) is compiled into the wheel, as in the CPU trainer image: JIT-built instead, it
# is compiled again in every new checkout (its build line names the venv's paths), about 2 minutes
# of both cores in CI. The wheel is kept in our own cache folder keyed by both versions, not in
# pip's, whose wheel cache would hand back a DeepSpeed built with other DS_BUILD_* settings.
torch_version=2.15.0
deepspeed_version=0.19.8
"$venv/bin/python" -m pip install --quiet "torch==$torch_version"
# The machine's build cache (e2e/localcluster/paths.py: FTO_CACHE_DIR, else XDG_CACHE_HOME) and Python's version.
read -r cache py_tag < <("$venv/bin/python" -c 'import sys; from e2e.localcluster.paths import cache_dir
print(cache_dir(), f"py{sys.version_info[0]}{sys.version_info[1]}")')
wheels="$cache/wheels/deepspeed-$deepspeed_version-cpu-shm-torch$torch_version-$py_tag"
if ! ls "$wheels"/deepspeed-*.whl >/dev/null 2>&1; then
  mkdir -p "$wheels.tmp"
  DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "$venv/bin/python" -m pip wheel --quiet --no-deps \
    --no-build-isolation --no-cache-dir -w "$wheels.tmp" "deepspeed==$deepspeed_version"
  rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi
# Replacing a DeepSpeed installed otherwise (same version, so pip would keep it), then its dependencies.
"$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheels"/deepspeed-*.whl
"$venv/bin/python" -m pip install --quiet "$wheels"/deepspeed-*.whl
"$venv/bin/python" -m pip install --quiet -e ".[trainer,dev]"
