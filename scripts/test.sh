#!/usr/bin/env bash
# Every test tier: unit (tests/), the control plane and end to end (e2e/tests/).
# Starts the local cluster when none is running and stops it again afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
started_here=0
if ! $py -m e2e.localcluster status >/dev/null 2>&1; then
  started_here=1
  $py -m e2e.localcluster up
fi
cleanup() { if [ "$started_here" = 1 ]; then $py -m e2e.localcluster down || true; fi; }
trap cleanup EXIT
$py -m pytest "$@"
