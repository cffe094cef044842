#!/usr/bin/env bash
# The seeded fault campaign (tests/campaign.h): each trial starts a small tesserad cluster and
# trainers, injects random faults (trainer and daemon kills, lost nodes, flipped bytes, stopped
# daemons, zombie incarnations, whole-job restarts, network partitions and cut links where
# namespaces work), restarts the whole job and checks what every rank restored. Prints each
# trial's seed, a rerun line for each failure, and a table; exits 1 when a trial failed.
#
#   tools/campaign.sh --trials N [--seed S] [--min-faults N] [--max-faults N]
#                     [--script kind,kind,...] [--keep-logs DIR] [--no-partitions]
#                     [--skip-when-busy] [--progress-deadline-s N] [--budget-s N]
#                     [--tls drawn|on|off]
#
# --budget-s starts no trial after N seconds (with a large --trials: as many as fit).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-partitions|--skip-when-busy) args+=("$1"); shift ;;
    --*=*) args+=("$1"); shift ;;
    --trials|--seed|--min-faults|--max-faults|--script|--keep-logs|--progress-deadline-s|--budget-s|--tls)
      [ $# -ge 2 ] || { echo "campaign: $1 needs a value" >&2; exit 2; }
      args+=("$1=$2"); shift 2 ;;
    *) echo "campaign: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
# `bazel run` builds it and runs it from its runfiles directory, where it finds the daemon and
# the trainer.
exec bazel run --noshow_progress --ui_event_filters=-info //tests:fault_campaign -- "${args[@]}"
