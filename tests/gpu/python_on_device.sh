#!/usr/bin/env bash
# The Python side on a GPU machine, from a bundle made as tests/gpu/run_on_device.sh says (with
# bazel-bin/agent/libtessera.so in it): the Python tests that use CUDA, then the snapshot-latency
# example and, time permitting, the staging example at a snapshot every step. Prints each part's
# result; the last line of each example is its table.
#
#   tests/gpu/python_on_device.sh [BUNDLE] [SECONDS]
#
# SECONDS (default 540) bounds the whole run; each part gets what is left, the examples last.
set -uo pipefail
bundle=$(cd "${1:-.gpu/all}" && pwd)
budget=${2:-540}
# shellcheck disable=SC1091
source "$bundle/env.sh"
export TESSERAD=$bundle/bin/tesserad TESSERA_LIBRARY=$bundle/lib/libtessera.so
export PYTHONPATH=$PWD/agent/python${PYTHONPATH:+:$PYTHONPATH}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
rc=0

echo "=== python tests using CUDA"
if python3 -c "import pytest" 2>/dev/null; then
  timeout --signal=KILL "$(left)" python3 -m pytest -q -rs -p no:cacheprovider \
    tests/python/test_snapshotter.py tests/python/test_dp.py -k "cuda or gpu" 2>&1 | tail -15
  status=${PIPESTATUS[0]}
  echo "=== python tests: exit $status"
  [ "$status" -eq 0 ] || rc=1
else
  echo "=== python tests: skipped, pytest is not installed here"
fi

echo "=== snapshot_latency_gpu.py"
timeout --signal=KILL "$(left)" python3 examples/snapshot_latency_gpu.py --snapshots 150 2>&1 |
  tail -8

if [ "$(left)" -gt 150 ]; then
  echo "=== staging_gpu.py --intervals 1"
  timeout --signal=KILL "$(left)" python3 examples/staging_gpu.py --intervals 1 --iters 30 2>&1 |
    tail -12
fi
exit $rc
