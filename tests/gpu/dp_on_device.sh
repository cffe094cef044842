#!/usr/bin/env bash
# DP-sharded snapshots on the GPU machine (issue 7): the Python DP tests (tests/python/test_dp.py,
# its CUDA variant included) and the sharded-vs-unsharded benchmark (examples/dp_gpu.py), from a
# bundle made here:
#
#   bazel build //daemon:tesserad //agent:libtessera.so
#   ../shared/tools/gpu-bundle .gpu/dp bazel-bin/daemon/tesserad bazel-bin/agent/libtessera.so
#   then on the GPU machine, from the repository root: tests/gpu/dp_on_device.sh .gpu/dp
#
# Sized for about 3 minutes on an H100 (an estimate: not yet run on one). Outputs go to $OUT
# (when set) as well: dp_tests.txt, dp_gpu.txt. Exits non-zero when a test fails or the benchmark
# does not finish.
set -uo pipefail
bundle=$(cd "${1:?usage: tests/gpu/dp_on_device.sh BUNDLE}" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-$(mktemp -d /tmp/tessera-gpu-dp-XXXXXX)}
mkdir -p "$out"
# shellcheck disable=SC1091
source "$bundle/env.sh"
export TESSERAD=$bundle/bin/tesserad
export TESSERA_LIBRARY=$bundle/lib/libtessera.so
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "(no nvidia-smi)"
df -h /dev/shm | tail -1
rc=0

echo "=== Python DP tests"
(cd "$repo" && timeout --signal=TERM --kill-after=20 300 \
  python3 -m pytest -q -rs -s -p no:cacheprovider tests/python/test_dp.py) \
  > "$out/dp_tests.txt" 2>&1 || rc=1
# The seeds, the shard sizes, each member's restore stats and the library's gather line, and the
# summary; the whole output is in dp_tests.txt.
shown="seed [0-9]+ \(|layout |^sealed payload|^rank [0-9]+: |^  rank |GPU |passed|failed|skipped"
grep -E "$shown|Error|error" "$out/dp_tests.txt" | grep -v "^20..-..-..T" | tail -60

echo "=== DP benchmark"
timeout --signal=TERM --kill-after=20 240 python3 -u "$repo/examples/dp_gpu.py" 2>&1 \
  | grep -v "^20..-..-..T" > "$out/dp_gpu.txt" || rc=1
sed -n '/^GPU:/,$p' "$out/dp_gpu.txt"
if ! grep -q "^GPU:" "$out/dp_gpu.txt"; then
  echo "the benchmark printed no table:"
  tail -30 "$out/dp_gpu.txt"
fi
exit $rc
