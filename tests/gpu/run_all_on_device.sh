#!/usr/bin/env bash
# One device run of everything GPU: the GPU tests (tests/gpu/run_on_device.sh), the Python CUDA
# tests, the staging benchmark (examples/staging_gpu.py) and the DCP comparison
# (examples/compare_gpu.py), from a bundle made here:
#
#   bazel build //tests/gpu:all //cuda:copy_engine_gpu_test //daemon:tesserad //agent:libtessera.so
#   ../shared/tools/gpu-bundle .gpu/all bazel-bin/daemon/tesserad bazel-bin/tests/gpu/gpu_trainer \
#       bazel-bin/tests/gpu/gpu_snapshot_test bazel-bin/cuda/copy_engine_gpu_test \
#       bazel-bin/agent/libtessera.so
#   then on the GPU machine, from the repository root: tests/gpu/run_all_on_device.sh .gpu/all
#
# Needs about 9 minutes on an H100 or H200. Outputs go to $OUT (when set) as well.
set -uo pipefail
bundle=${1:?usage: tests/gpu/run_all_on_device.sh BUNDLE}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-$(mktemp -d /tmp/tessera-gpu-all-XXXXXX)}
mkdir -p "$out"
rc=0
OUT=$out bash "$here/run_on_device.sh" "$bundle" > "$out/gpu_tests.txt" 2>&1 || rc=1
grep -E "^\[ *(OK|FAILED|SKIPPED) *\]|passed, .* failed" "$out/gpu_tests.txt"
# shellcheck disable=SC1091
source "$bundle/env.sh"
export TESSERAD=$(cd "$bundle" && pwd)/bin/tesserad
export TESSERA_LIBRARY=$(cd "$bundle" && pwd)/lib/libtessera.so
echo "=== Python CUDA tests"
(cd "$repo" && timeout 240 python3 -m pytest -q -p no:cacheprovider tests/python -k "cuda" \
  2>&1 | tail -5) || rc=1
echo "=== staging benchmark"
timeout --signal=TERM 300 python3 -u "$repo/examples/staging_gpu.py" 2>&1 \
  | grep -v "^20..-..-..T" > "$out/staging.txt" || rc=1
sed -n '/^GPU:/,$p' "$out/staging.txt"
echo "=== DCP comparison"
COMPARE_TIMEOUT_S=250 OUT=$out bash "$repo/examples/compare_gpu.sh" "$bundle" --budget-s 210 2>&1 \
  | grep -v "^20..-..-..T" > "$out/compare.txt" || rc=1
sed -n '/^## Tessera vs/,$p' "$out/compare.txt"
exit $rc
