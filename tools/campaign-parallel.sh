#!/usr/bin/env bash
# The seeded fault campaign (tools/campaign.sh) on several workers at once, for machines with more
# cores than one trial needs: worker w runs trials with seeds S + w*N .. S + w*N + N - 1, each
# trial with its own daemons, trainers, shared memory and ports. Prints every worker's failures
# with their rerun lines, then one table summed over the workers, in the campaign's own format;
# exits 1 when a trial failed. Every failed trial's output is also gathered in OUT/failures.txt.
#
#   tools/campaign-parallel.sh --workers P --trials N [--seed S] [--budget-s B] [--bin DIR]
#                              [--out DIR] [-- campaign arguments...]
#
# --trials is per worker; --budget-s starts no trial after B seconds on any worker.
# --bin DIR runs binaries from a bundle (tools gpu-bundle layout: DIR/bin/{fault_campaign,
# tesserad,trainer}, DIR/env.sh) instead of building with Bazel: how the campaign runs on a
# machine without the build tools. --out keeps each worker's output (default: a temporary dir).
set -euo pipefail
cd "$(dirname "$0")/.."
workers=4 trials=25 seed=$(( $(od -An -N4 -tu4 /dev/urandom) % 100000000 )) budget=0 bin="" out=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workers|--trials|--seed|--budget-s|--bin|--out)
      [ $# -ge 2 ] || { echo "campaign-parallel: $1 needs a value" >&2; exit 2; }
      case "$1" in
        --workers) workers=$2 ;; --trials) trials=$2 ;; --seed) seed=$2 ;;
        --budget-s) budget=$2 ;; --bin) bin=$2 ;; --out) out=$2 ;;
      esac
      shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "campaign-parallel: unknown argument '$1' (campaign arguments go after --)" >&2
       exit 2 ;;
  esac
done
for v in "$workers" "$trials" "$seed" "$budget"; do
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "campaign-parallel: '$v' is not a whole number" >&2; exit 2; }
done
[ "$workers" -ge 1 ] && [ "$workers" -le 64 ] || { echo "campaign-parallel: --workers 1..64" >&2; exit 2; }
[ "$trials" -ge 1 ] || { echo "campaign-parallel: --trials must be at least 1" >&2; exit 2; }

if [ -n "$bin" ]; then
  for f in fault_campaign tesserad trainer; do
    [ -x "$bin/bin/$f" ] || { echo "campaign-parallel: $bin/bin/$f is missing" >&2; exit 2; }
  done
  set +eu +o pipefail  # env.sh looks for CUDA libraries that may not be there
  # shellcheck disable=SC1091
  source "$bin/env.sh"
  set -eu -o pipefail
  runfiles=$(mktemp -d)
  mkdir -p "$runfiles/tessera/daemon" "$runfiles/tessera/tests"
  ln -s "$(cd "$bin/bin" && pwd)/tesserad" "$runfiles/tessera/daemon/tesserad"
  ln -s "$(cd "$bin/bin" && pwd)/trainer" "$runfiles/tessera/tests/trainer"
  export TEST_SRCDIR=$runfiles TEST_WORKSPACE=tessera
  campaign="$bin/bin/fault_campaign"
else
  bazel build --noshow_progress --ui_event_filters=-info //tests:fault_campaign
  campaign="bazel-bin/tests/fault_campaign"
fi
[ -n "$out" ] || out=$(mktemp -d)
mkdir -p "$out"
echo "campaign-parallel: $workers workers x $trials trials from seed $seed," \
     "budget ${budget}s, $(nproc) cores; outputs in $out"
start=$(date +%s)
pids=()
for ((w = 0; w < workers; ++w)); do
  "$campaign" --seed=$((seed + w * trials)) --trials="$trials" --budget-s="$budget" \
      "${extra[@]}" > "$out/worker-$w.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done
echo "campaign-parallel: done in $(( $(date +%s) - start )) s"
python3 - "$out" "$workers" <<'PY'
import re, sys, collections
out, workers = sys.argv[1], int(sys.argv[2])
total = passed = failed = 0
injected, in_failed = collections.OrderedDict(), collections.Counter()
checks, seeds = collections.OrderedDict(), collections.defaultdict(list)
for w in range(workers):
    text = open(f"{out}/worker-{w}.txt", errors="replace").read()
    m = re.search(r"^(\d+) trial\(s\): (\d+) passed, (\d+) failed$", text, re.M)
    if not m:
        print(f"worker {w}: no summary line (crashed?); its output ends:\n" + text[-2000:])
        failed += 1
        continue
    total += int(m.group(1)); passed += int(m.group(2)); failed += int(m.group(3))
    section = []
    for line in text.splitlines():
        if line.startswith("=== trial ") and "/" in line.split(",")[0]:
            section = []  # "=== trial i/N, seed S ===" opens a trial's output
        section.append(line)
        if line.startswith("=== trial seed") and "FAIL" in line:
            print(f"worker {w}: {line}")
            # Each failure's whole output (trace, daemon log excerpts), bounded, in one file.
            with open(f"{out}/failures.txt", "a") as f:
                f.write(f"--- worker {w}\n" + "\n".join(section[:600]) + "\n")
    table = text[m.end():]
    part = table.split("failed check")
    for row in re.findall(r"^([a-z-]+)[ \t]+(\d+)[ \t]+(\d+)$", part[0], re.M):
        injected[row[0]] = injected.get(row[0], 0) + int(row[1])
        in_failed[row[0]] += int(row[2])
    if len(part) > 1:
        for row in re.findall(r"^([a-z-]+)[ \t]+(\d+)[ \t]*(.*)$", part[1], re.M):
            checks[row[0]] = checks.get(row[0], 0) + int(row[1])
            seeds[row[0]] += row[2].split()
print(f"\n{total} trial(s): {passed} passed, {failed} failed (over {workers} workers)\n")
print(f"{'fault':<20}{'injected':>8}{'in failed trials':>18}")
for k, v in injected.items():
    print(f"{k:<20}{v:>8}{in_failed[k]:>18}")
print(f"\n{'failed check':<20}{'trials':>8}  seeds")
for k, v in checks.items():
    print(f"{k:<20}{v:>8}  {' '.join(seeds[k])}")
sys.exit(1 if failed else 0)
PY
