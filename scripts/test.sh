#!/usr/bin/env bash
# Every test tier: unit (tests/), the control plane and end to end (e2e/tests/).
# Starts the local cluster when none is running and stops it again afterwards.
# Without arguments the unit tier runs beside the cluster's start and the cluster tier (two pytest
# processes): the cluster tier starts with its KWOK tests, which mostly wait, and leaves real training
# and timed tests for later (e2e/conftest.py orders them); each lists its slowest tests at the end.
# With arguments: one pytest with those arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
started_here=0
unit_pid=""
cleanup() {
  if [ -n "$unit_pid" ]; then kill "$unit_pid" 2>/dev/null || true; fi
  # `down` fails when anything of the cluster is left behind (processes, mounts, bridge, chains).
  if [ "$started_here" = 1 ] && ! $py -m e2e.localcluster down; then
    echo "test.sh: the local cluster did not stop cleanly" >&2
    exit 1
  fi
}
trap cleanup EXIT
start_cluster() {
  if ! $py -m e2e.localcluster status >/dev/null 2>&1; then
    started_here=1
    $py -m e2e.localcluster up
  fi
}
if [ $# -gt 0 ]; then
  start_cluster
  $py -m pytest "$@"
  exit
fi
mkdir -p .cache
unit_log=.cache/unit-tier.log
start=$(date +%s)
$py -m pytest --durations=15 tests >"$unit_log" 2>&1 &
unit_pid=$!
start_cluster
set +e
$py -m pytest --durations=40 e2e/tests
cluster_rc=$?
wait "$unit_pid"
unit_rc=$?
unit_pid=""
set -e
echo "==== the unit tier (tests/), run beside the cluster tier: $unit_log ===="
cat "$unit_log"
echo "test.sh: unit tier exit $unit_rc, cluster tier exit $cluster_rc, $(( $(date +%s) - start ))s"
[ "$unit_rc" = 0 ] && [ "$cluster_rc" = 0 ]
