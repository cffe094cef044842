#!/usr/bin/env bash
# Runs examples/compare_gpu.py on the GPU machine with a bundle made here:
#
#   bazel build //daemon:tesserad //agent:libtessera.so
#   ../shared/tools/gpu-bundle .gpu/compare bazel-bin/daemon/tesserad bazel-bin/agent/libtessera.so
#   then on the GPU machine, from the repository root: examples/compare_gpu.sh .gpu/compare [args]
#
# Sources the bundle's env.sh, points TESSERAD and TESSERA_LIBRARY into it, prints the GPU and
# /dev/shm, and runs the script under a timeout (COMPARE_TIMEOUT_S, default 290 s; SIGTERM lets it
# stop its tesserad). The output goes to $OUT/compare_gpu.txt too, when OUT is set.
set -uo pipefail
bundle=$(cd "${1:?usage: examples/compare_gpu.sh BUNDLE [compare_gpu.py args]}" && pwd)
shift
# shellcheck disable=SC1091
source "$bundle/env.sh"
export TESSERAD=${TESSERAD:-$bundle/bin/tesserad}
export TESSERA_LIBRARY=${TESSERA_LIBRARY:-$bundle/lib/libtessera.so}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$(mktemp -d /tmp/compare-gpu-XXXXXX)}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
df -h /dev/shm | tail -1
timeout --signal=TERM --kill-after=20 "${COMPARE_TIMEOUT_S:-290}" \
  python3 -u "$here/compare_gpu.py" "$@" 2>&1 | tee "$out/compare_gpu.txt"
exit "${PIPESTATUS[0]}"
