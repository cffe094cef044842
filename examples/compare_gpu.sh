#!/usr/bin/env bash
# Runs examples/compare_gpu.py on the GPU machine with a bundle made here:
#
#   bazel build //daemon:tesserad //agent:libtessera.so
#   ../shared/tools/gpu-bundle .gpu/compare bazel-bin/daemon/tesserad bazel-bin/agent/libtessera.so
#   then on the GPU machine, from the repository root: examples/compare_gpu.sh .gpu/compare [args]
#
# Sources the bundle's env.sh, points TESSERAD and TESSERA_LIBRARY into it, prints the GPU and
# /dev/shm, and runs the script with every further argument (e.g. --fsdp2 --intervals 1,5,10
# --budget-s 300) under a timeout: COMPARE_TIMEOUT_S, default the script's --budget-s (225 s
# unless given) plus 65 s for its start and final table; SIGTERM lets it stop its tesserad. The
# output goes to $OUT/compare_gpu.txt too, when OUT is set.
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
budget_s=225
previous=
for arg in "$@"; do
  case $arg in --budget-s=*) budget_s=${arg#--budget-s=} ;; esac
  [[ $previous == --budget-s ]] && budget_s=$arg
  previous=$arg
done
budget_s=${budget_s%%[!0-9]*}  # whole seconds
timeout_s=${COMPARE_TIMEOUT_S:-$(( ${budget_s:-225} + 65 ))}
echo "compare_gpu.py $* (timeout ${timeout_s} s)"
timeout --signal=TERM --kill-after=20 "$timeout_s" \
  python3 -u "$here/compare_gpu.py" "$@" 2>&1 | tee "$out/compare_gpu.txt"
exit "${PIPESTATUS[0]}"
