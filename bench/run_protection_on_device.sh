#!/usr/bin/env bash
# Runs bench/protection_bench on the GPU machine (no gRPC, protobuf or ISA-L installed there) from
# a bundle made here:
#
#   bazel build -c opt //bench:protection_bench //daemon:tesserad
#   ../shared/tools/gpu-bundle .gpu/protection bazel-bin/bench/protection_bench \
#       bazel-bin/daemon/tesserad
#   then on the GPU machine, from the repository root:
#   bench/run_protection_on_device.sh .gpu/protection
#
# Shards of 64 MiB to 4 GiB (BENCH_ARGS overrides the benchmark's flags). The table goes to
# stdout and to $OUT/protection_bench.txt when OUT is set. The run is cut off after
# BENCH_TIMEOUT_S seconds (default 270), keeping whatever sizes finished; exits non-zero then or
# when the benchmark fails.
set -uo pipefail
bundle=$(cd "${1:?usage: run_protection_on_device.sh BUNDLE}" && pwd)
# shellcheck disable=SC1091
source "$bundle/env.sh"
out=${OUT:-$(mktemp -d /tmp/tessera-protection-XXXXXX)}
mkdir -p "$out"
{
  echo "host: $(hostname), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
  df -h /dev/shm | tail -1
} | tee "$out/protection_bench.txt"
# shellcheck disable=SC2086
timeout --signal=TERM "${BENCH_TIMEOUT_S:-270}" "$bundle/bin/protection_bench" \
  --tesserad="$bundle/bin/tesserad" ${BENCH_ARGS:---max_mib=4096 --repeats=7} 2>&1 |
  tee -a "$out/protection_bench.txt"
rc=${PIPESTATUS[0]}
echo "protection_bench: exit $rc" | tee -a "$out/protection_bench.txt"
# Daemons of a cut-off run die with it (PR_SET_PDEATHSIG); their directories may stay.
rm -rf /dev/shm/tessera-pb[0-9]-* 2>/dev/null
exit "$rc"
