#!/usr/bin/env bash
# Runs the GPU tests and the GPU benchmark on a GPU machine from a bundle made here:
#
#   bazel build //tests/gpu:all //cuda:copy_engine_gpu_test //bench:gpu_snapshot_bench //daemon:tesserad
#   ../shared/tools/gpu-bundle .gpu/issue3 bazel-bin/daemon/tesserad \
#       bazel-bin/tests/gpu/gpu_trainer bazel-bin/tests/gpu/gpu_snapshot_test \
#       bazel-bin/cuda/copy_engine_gpu_test bazel-bin/bench/gpu_snapshot_bench
#   cp tests/gpu/run_on_device.sh .gpu/issue3/
#   then on the GPU machine, from the repository root: tests/gpu/run_on_device.sh [.gpu/issue3]
#
# (The benchmark is optional: a bundle without it runs the tests only.)
# Prints each test's output, the benchmark's table, and a last line "N passed, N failed,
# N skipped" counted from the gtest XML reports. Exits non-zero when a test fails or the
# benchmark does not finish. Results go to $OUT (when set) as well. Extra environment (see the
# tests): TESSERA_TEST_SEED, TESSERA_GPU_KILLS, TESSERA_GPU_LARGE_BYTES, BENCH_ARGS.
set -uo pipefail
bundle=$(cd "${1:-.gpu/issue3}" && pwd)
# shellcheck disable=SC1091
source "$bundle/env.sh"
out=${OUT:-$(mktemp -d /tmp/tessera-gpu-XXXXXX)}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
df -h /dev/shm | tail -1

# The tests find tesserad and gpu_trainer as Bazel runfiles (tests/harness.h): lay them out so.
runfiles=$(mktemp -d /tmp/tessera-runfiles-XXXXXX)
mkdir -p "$runfiles/tessera/daemon" "$runfiles/tessera/tests/gpu"
ln -s "$bundle/bin/tesserad" "$runfiles/tessera/daemon/tesserad"
ln -s "$bundle/bin/gpu_trainer" "$runfiles/tessera/tests/gpu/gpu_trainer"
export TEST_SRCDIR=$runfiles TEST_WORKSPACE=tessera
export TESSERA_GPU_TRAINER=$bundle/bin/gpu_trainer TESSERAD=$bundle/bin/tesserad

rc=0
run_test() {  # name timeout_s
  echo "=== $1"
  local start=$SECONDS
  timeout --signal=KILL "$2" "$bundle/bin/$1" --gtest_output="xml:$out/$1.xml" 2>&1 | tee "$out/$1.log"
  local status=${PIPESTATUS[0]}
  echo "=== $1: exit $status in $((SECONDS - start)) s"
  [ "$status" -eq 0 ] || rc=1
}

run_test copy_engine_gpu_test 90
# NCCL for the DP-sharded restore: the libnccl that PyTorch brings, when no other is configured.
if [ -z "${TESSERA_NCCL_LIBRARY:-}" ]; then
  TESSERA_NCCL_LIBRARY=$(python3 - <<'PY' 2>/dev/null
import glob, os, sys
for p in sys.path:
    for c in sorted(glob.glob(os.path.join(p, "nvidia", "nccl", "lib", "libnccl.so*")) +
                    glob.glob(os.path.join(p, "torch", "lib", "libnccl.so*"))):
        print(c)
        raise SystemExit
PY
)
  export TESSERA_NCCL_LIBRARY
fi
echo "TESSERA_NCCL_LIBRARY=${TESSERA_NCCL_LIBRARY:-(none found)}"
if [ -x "$bundle/bin/nccl_group_gpu_test" ]; then run_test nccl_group_gpu_test 120; fi
if [ -x "$bundle/bin/gpu_snapshot_bench" ]; then
  echo "=== gpu_snapshot_bench ${BENCH_ARGS:-}"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout --signal=KILL 200 "$bundle/bin/gpu_snapshot_bench" --tesserad="$TESSERAD" ${BENCH_ARGS:-} \
    > >(tee "$out/gpu_snapshot_bench.txt") 2> >(tee "$out/gpu_snapshot_bench.err" >&2)
  status=$?
  echo "=== gpu_snapshot_bench: exit $status in $((SECONDS - start)) s"
  [ "$status" -eq 0 ] || rc=1
else
  echo "=== gpu_snapshot_bench: not in the bundle, not run"
fi
run_test gpu_snapshot_test 260

rm -rf "$runfiles"
python3 - "$out" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for path in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    for case in ET.parse(path).iter("testcase"):
        if case.find("failure") is not None:
            failed += 1
        elif case.get("result") == "skipped" or case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
exit $rc
