#!/usr/bin/env bash
# The main demo: real tesserad daemons (one per simulated node) and real trainer processes on this
# machine. Trainers snapshot every step; a trainer is SIGKILLed and restarted and resumes from its
# newest sealed step; a daemon is SIGKILLed and restarted and keeps every sealed snapshot while
# its trainers keep training; at the end a fresh process checks every rank bit-exact.
set -euo pipefail
cd "$(dirname "$0")/.."
bazel build //daemon:tesserad //tests:trainer --show_result=0 2>/dev/null
bin=$(bazel info bazel-bin 2>/dev/null)
tesserad=$bin/daemon/tesserad
trainer=$bin/tests/trainer

root=$(mktemp -d /dev/shm/tessera-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
t0=$(now_ms)
say() { printf '[%7.3fs] %s\n' "$(( $(now_ms) - t0 ))e-3" "$*"; }
ms_since() { echo $(( $(now_ms) - $1 )); }

declare -A daemon_pid
start_daemon() {  # node; its log of this start is $root/$1.log
  [ -f "$root/$1.log" ] && cat "$root/$1.log" >>"$root/$1.log.old"
  "$tesserad" --set node.id="$1" --set store.directory="$root/shm" \
    --set agent.socket_path="$root/$1.sock" --set store.capacity_bytes=4GiB \
    2>"$root/$1.log" &
  daemon_pid[$1]=$!
  pids+=($!)
  for _ in $(seq 500); do grep -q ' ready: ' "$root/$1.log" && return; sleep 0.02; done
  echo "tesserad $1 did not start:"; cat "$root/$1.log"; exit 1
}

world=4
node_of() { [ "$1" -lt 2 ] && echo node-a || echo node-b; }
args_of() {  # rank
  echo "--socket=$root/$(node_of "$1").sock --job=demo --rank=$1 --world=$world --seed=$((1000 + $1))" \
       "--tensors=24 --min-bytes=4096 --max-bytes=16777216 --total-bytes=67108864"
}
declare -A trainer_pid
start_trainer() {  # rank
  # shellcheck disable=SC2046
  "$trainer" $(args_of "$1") --when-busy=wait --step-sleep-ms=5 >"$root/rank$1.out" 2>>"$root/rank$1.err" &
  trainer_pid[$1]=$!
  pids+=($!)
}
wait_line() {  # file regex timeout_s
  for _ in $(seq $(( $3 * 50 ))); do grep -qE "$2" "$1" 2>/dev/null && return 0; sleep 0.02; done
  echo "timed out waiting for '$2' in $1:"; tail -5 "$1"; exit 1
}
last() { grep -oE "^$2 [0-9]+" "$1" | tail -1 | cut -d' ' -f2; }

echo "Tessera demo: 2 nodes (node-a, node-b), job 'demo' with $world ranks of 64 MiB each, a snapshot every step"
echo
start_daemon node-a
start_daemon node-b
say "tesserad node-a and node-b are up ($root/shm)"
for r in 0 1 2 3; do start_trainer $r; done
for r in 0 1 2 3; do wait_line "$root/rank$r.out" '^sealed ([5-9]|[1-9][0-9]+)$' 60; done
say "all ranks are snapshotting: $(for r in 0 1 2 3; do printf 'rank %d at step %s; ' $r "$(last "$root/rank$r.out" sealed)"; done)"

echo
echo "== 1. A trainer crashes (SIGKILL of rank 1) and is restarted =="
kill -9 "${trainer_pid[1]}"; wait "${trainer_pid[1]}" 2>/dev/null || true
sealed_at_kill=$(last "$root/rank1.out" sealed)
started_at_kill=$(last "$root/rank1.out" snapshot)
say "rank 1 killed; it had sealed step $sealed_at_kill (step $started_at_kill was in flight)"
mv "$root/rank1.out" "$root/rank1.before"
t=$(now_ms); start_trainer 1
wait_line "$root/rank1.out" '^(resumed|fresh|error)' 60
grep -q '^error' "$root/rank1.out" && { cat "$root/rank1.out"; exit 1; }
resumed=$(last "$root/rank1.out" resumed)
say "rank 1 restarted and restored step $resumed in $(last "$root/rank1.out" restore_ms) ms (64 MiB, then every byte checked); $(ms_since $t) ms from process start"
[ "$resumed" -ge "$sealed_at_kill" ] || { echo "FAIL: lost sealed step $sealed_at_kill"; exit 1; }

echo
echo "== 2. A daemon crashes (SIGKILL of tesserad on node-b) while ranks 2 and 3 snapshot =="
b2=$(last "$root/rank2.out" sealed); b3=$(last "$root/rank3.out" sealed)
kill -9 "${daemon_pid[node-b]}"; wait "${daemon_pid[node-b]}" 2>/dev/null || true
say "tesserad node-b killed; ranks 2 and 3 had sealed steps $b2 and $b3 and keep training"
t=$(now_ms); start_daemon node-b
say "tesserad node-b restarted in $(ms_since $t) ms: $(grep -oE '[0-9]+ snapshots re-adopted' "$root/node-b.log" | tail -1)"
for r in 2 3; do
  before=$([ $r -eq 2 ] && echo "$b2" || echo "$b3")
  for _ in $(seq 3000); do [ "$(last "$root/rank$r.out" sealed)" -gt "$before" ] && break; sleep 0.02; done
  [ "$(last "$root/rank$r.out" sealed)" -gt "$before" ] || { echo "FAIL: rank $r sealed nothing after the restart"; exit 1; }
done
say "ranks 2 and 3 re-registered by themselves and sealed steps $(last "$root/rank2.out" sealed) and $(last "$root/rank3.out" sealed)"

echo
echo "== 3. Every rank is checked bit-exact from a fresh process =="
for r in 0 1 2 3; do kill -9 "${trainer_pid[$r]}" 2>/dev/null || true; wait "${trainer_pid[$r]}" 2>/dev/null || true; done
ok=1
for r in 0 1 2 3; do
  sealed=$(last "$root/rank$r.out" sealed)
  # shellcheck disable=SC2046
  "$trainer" $(args_of $r) --mode=verify >"$root/verify$r.out" 2>/dev/null || true
  out=$(tail -1 "$root/verify$r.out")
  v=${out#verified }
  if [[ "$out" == verified* ]] && [ "$v" -ge "$sealed" ]; then
    say "rank $r: restored step $v (last reported sealed $sealed) in $(last "$root/verify$r.out" restore_ms) ms, 64 MiB bit-exact"
  else
    say "rank $r: FAILED: $out (last reported sealed $sealed)"; ok=0
  fi
done
echo
if [ $ok -eq 1 ]; then
  echo "Demo passed: no sealed snapshot was lost to a trainer crash or a daemon crash."
else
  echo "Demo FAILED"; exit 1
fi
