#!/usr/bin/env bash
# The Python side on a GPU machine, from a bundle made as tests/gpu/run_on_device.sh says (with
# bazel-bin/agent/libtessera.so in it): the Python tests that use CUDA (with the loop-state tests
# and the Snapshotter-as-DCP-checkpoint tests, whole, on torch 2.x), the Snapshotter over
# DTensors (FSDP2, TP), tessera.dcp with the real DCP, the blocking benchmark of snapshot() and,
# time permitting, the staging example at a snapshot every step. Prints each part's result.
#
#   tests/gpu/python_on_device.sh [BUNDLE] [SECONDS]
#
# SECONDS (default 540) bounds the whole run; each part gets what is left, the examples last.
# PARTS (default: all of "pytest dtensor dcp multi_rank blocking staging") picks the parts to run.
set -uo pipefail
bundle=$(cd "${1:-.gpu/all}" && pwd)
budget=${2:-540}
# shellcheck disable=SC1091
source "$bundle/env.sh"
export TESSERAD=$bundle/bin/tesserad TESSERA_LIBRARY=$bundle/lib/libtessera.so
export PYTHONPATH=$PWD/agent/python${PYTHONPATH:+:$PYTHONPATH}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
parts=" ${PARTS:-pytest dtensor dcp multi_rank blocking staging} "
want() { [[ "$parts" == *" $1 "* ]]; }
rc=0

if ! want pytest; then
  :
elif python3 -c "import pytest" 2>/dev/null; then
  echo "=== python tests using CUDA"
  timeout --signal=KILL "$(left)" python3 -m pytest -q -rfEs -p no:cacheprovider \
    tests/python/test_snapshotter.py tests/python/test_dp.py tests/python/test_external_loop.py \
    tests/python/test_loop_state.py tests/python/test_snapshot_checkpoint.py \
    -k "cuda or gpu or loop_state or snapshot_checkpoint" 2>&1 |
    sed -n '/^=* \(FAILURES\|short test summary\)/,$p' | grep -v "Warning\|warn(" | tail -80
  status=${PIPESTATUS[0]}
  echo "=== python tests: exit $status"
  [ "$status" -eq 0 ] || rc=1
else
  echo "=== python tests: skipped, pytest is not installed here"
fi

for script in tests/gpu/dtensor_on_device.py tests/gpu/dcp_on_device.py; do
  name=${script#tests/gpu/}
  want "${name%_on_device.py}" || continue
  echo "=== $script"
  timeout --signal=KILL "$(left)" python3 "$script" 2>&1 | tail -25
  status=${PIPESTATUS[0]}
  echo "=== $script: exit $status"
  [ "$status" -eq 0 ] || rc=1
done

# Several ranks of FSDP2, TP and FSDP2+TP: one GPU each where there are enough, else CPU
# processes (gloo), which exercise the same Snapshotter and SnapshotReader paths.
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
mr_device=cpu
[ "${gpus:-0}" -ge 2 ] && mr_device=cuda
if want multi_rank; then
echo "=== tests/gpu/multi_rank_on_device.py --device $mr_device ($gpus GPUs)"
timeout --signal=KILL "$(left)" python3 tests/gpu/multi_rank_on_device.py --device "$mr_device" 2>&1 |
  grep -v " [IW] [0-9]* \[" | tail -20
status=${PIPESTATUS[0]}
echo "=== tests/gpu/multi_rank_on_device.py: exit $status"
[ "$status" -eq 0 ] || rc=1
fi

if want blocking; then
echo "=== bench/python_snapshot_blocking.py (0.82B GPT's shape: 24 blocks of 1024)"
timeout --signal=KILL "$(left)" python3 bench/python_snapshot_blocking.py --device cuda \
  --layers 24 --width 1024 --snapshots 200 2>&1 | tail -14
fi

if want staging && [ "$(left)" -gt 150 ]; then
  echo "=== staging_gpu.py --intervals 1"
  timeout --signal=KILL "$(left)" python3 examples/staging_gpu.py --intervals 1 --iters 30 2>&1 |
    tail -12
fi
exit $rc
