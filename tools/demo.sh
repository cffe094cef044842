#!/usr/bin/env bash
# The main demo, a multi-node drill on this machine (tests/demo_drill.cc): 6 tesserad daemons on
# loopback, each a simulated node with its own peer port and shared-memory directory, clustered
# with Reed-Solomon RS(3, 2); 12 real trainer processes snapshotting; a trainer SIGKILLed and
# restarted; a daemon SIGKILLed and restarted; two nodes lost with their memory, replacements
# started, and the lost nodes' ranks rebuilt from fragments; every restored byte checked. Prints
# each phase as it happens and a table of how long each took; exits nonzero if any check fails.
#
# Extra arguments go to the drill, e.g. tools/demo.sh --rank_mib=32 --seed=7 --keep
set -euo pipefail
cd "$(dirname "$0")/.."
if ! out=$(bazel build //tests:demo_drill 2>&1); then
  echo "$out" | tail -30
  echo "demo: the build failed"
  exit 1
fi
runfiles=$(bazel info bazel-bin 2>/dev/null)/tests/demo_drill.runfiles/tessera
cd "$runfiles"
exec ../../demo_drill "$@"
