#!/usr/bin/env bash
# DP-sharded snapshots on the GPU machine (issue 7): the Python DP tests (tests/python/test_dp.py,
# its CUDA variant included) and the sharded-vs-unsharded benchmark (examples/dp_gpu.py), from a
# bundle made here:
#
#   bazel build //daemon:tesserad //agent:libtessera.so
#   ../shared/tools/gpu-bundle .gpu/dp bazel-bin/daemon/tesserad bazel-bin/agent/libtessera.so
#   then on the GPU machine, from the repository root: tests/gpu/dp_on_device.sh .gpu/dp
#
# About 3 minutes on an H100. With several GPUs: the GPU cases of the tests (members one per GPU
# among them) and the benchmark as a real group, one process per GPU. Outputs go to $OUT (when
# set) as well: dp_tests.txt, dp_gpu.txt. Exits non-zero when a test fails or the benchmark does
# not finish.
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

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
echo "CUDA devices: $gpus"
# With several GPUs, the GPU cases only (the CPU ones run in CI), members one per GPU among them.
filter=()
if [ "$gpus" -ge 2 ]; then filter=(-k cuda); fi

echo "=== Python DP tests"
(cd "$repo" && timeout --signal=TERM --kill-after=20 300 \
  python3 -m pytest -q -rs -s -p no:cacheprovider "${filter[@]}" tests/python/test_dp.py) \
  > "$out/dp_tests.txt" 2>&1 || rc=1
# The seeds, the shard sizes, each member's restore stats and the library's gather line, and the
# summary; the whole output is in dp_tests.txt.
shown="seed [0-9]+ \(|layout |^sealed payload|^rank [0-9]+: |^  rank |GPU |passed|failed|skipped"
grep -E "$shown|Error|error" "$out/dp_tests.txt" | grep -v "^20..-..-..T" | tail -60

echo "=== DP benchmark"
# One GPU: it plays rank 0 of groups of 2, 4 and 8. Several: a real group, one process per GPU.
bench=("$repo/examples/dp_gpu.py")
if [ "$gpus" -ge 2 ]; then bench+=(--gpus "$(( gpus < 4 ? gpus : 4 ))"); fi
timeout --signal=TERM --kill-after=20 "${DP_BENCH_TIMEOUT_S:-240}" python3 -u "${bench[@]}" 2>&1 \
  | grep -v "^20..-..-..T" > "$out/dp_gpu.txt" || rc=1
sed -n '/^GPU:/,$p;/^=== member/p' "$out/dp_gpu.txt"
if ! grep -q "^GPU:" "$out/dp_gpu.txt"; then
  echo "the benchmark printed no table:"
  tail -30 "$out/dp_gpu.txt"
fi
exit $rc
