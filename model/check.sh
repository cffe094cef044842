#!/usr/bin/env bash
# Model-checks the commit/restore protocol (docs/PROTOCOL.md, model/commit.pml) with spin.
#
# Every case is one spin run.  A "pass" case is the protocol (with the rules of PROTOCOL.md) under
# a fault budget, searched exhaustively (every reachable state, -DCOLLAPSE, never bitstate); it
# must find no violation and must complete.  A "fail" case is a deliberately broken variant
# (BUG_*) or the protocol without one of its rules (PROTOCOL_AS_WRITTEN_*); it must produce a
# counterexample, and that counterexample must break the property the case names: this shows
# that the property has teeth.  Prints a table and ends with one line, alone:
# "N passed, N failed, N skipped".  Exits non-zero on any unexpected result.  Without spin (or
# gcc) every case is skipped, the line says how to install it, and the exit status is 0.
#
#   model/check.sh              the quick set (tools/run-tests.sh; about 2 minutes on 2 cores)
#   model/check.sh --full       the quick set and larger budgets (12 GB a run; many minutes each)
#   model/check.sh --trace NAME prints the counterexample of a case, step by step
#   options: --jobs N (parallel runs, default: the number of CPUs, at most 2 for the quick set),
#            --only NAME[,NAME], --keep DIR (keep the runs), --junit FILE (a JUnit report), --list
#
# The cases that must fail, what each breaks, and the pass case of the same budget (traces:
# --trace NAME):
#   as_written_dead_first   steps below a rank's first step of an epoch never become dead: the other
#                           rank waits forever for one of them (live; live_wait_crash_restart)
#   as_written_stuck_owner  a restarted owner whose shards are all of a void epoch (or refused by
#                           the holders) never gets a reply, keeps both slots, waits forever (live;
#                           full_live_three_steps)
#   bug_no_epoch            reports are not filtered by epoch: a commit mixes two histories (no_mix)
#   bug_partial_view        a restore is answered without waiting for every job daemon, and a
#                           coordinator that takes over does not gather the job's state: after a
#                           commit push to node 1 is delayed and coordinator 0 crashes, the new
#                           coordinator 1 answers a resume with an older commit than node 2 knows
#                           (never_behind; safe_coord_crash_state_delay)
#   bug_release_unprotected an owner releases a sealed step before it is protected: a step every
#                           rank sealed is never committed (live).  No safety property depends on
#                           this rule in the model: a committed step always has all k+m fragments.
#   bug_no_fence            messages of a restarted (older) incarnation are accepted (fencing)
#   bug_drop_committed      a holder drops the committed step's fragments once their epoch is old;
#                           with the owner lost the newest commit is gone (committed_restorable)
#   as_written              PROTOCOL.md without its rules: a restarted daemon forgets the epoch it
#                           learned, seals a new history's step under the old epoch, and its cold
#                           coordinator commits it with the other rank's old step (no_mix;
#                           safe_wait_crash_restart)
#   as_written_late_commit  a coordinator that restarted (or took over) without knowing the new
#                           epoch commits a step of the abandoned epoch from a delayed report: the
#                           ranks of one restart restore different steps (consistent_restart;
#                           safe_coord_holder_delay); happens with ranks in lockstep
#   as_written_epoch_rule   a restart whose first asker had not resumed in the current epoch joins
#                           it: two trainer runs share an epoch and a commit mixes them (no_mix;
#                           safe_two_restarts_msgs)
#   bug_drop_forgotten      a coordinator does not learn a drop from the daemons it gathers the
#                           job's state from: node 1, down while the job is dropped, comes back
#                           with its commit; the coordinator that decided the drop is lost and
#                           node 1 takes over and answers the relaunch with the dropped commit
#                           (drop_final; safe_drop_coord_change)
#   as_written_epoch_rule_retry  the same rule with ranks in lockstep: a duplicated (retried) resume
#                           of rank 0 starts an epoch that rank 1 has not resumed in; at the next
#                           job restart rank 1 asks first and joins it, the old run's step commits
#                           in it, and the ranks of that restart restore different steps
#                           (consistent_restart; safe_two_restarts_msgs)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=$here/commit.pml

mode=quick; jobs=""; only=""; keep=""; junit=""; trace=""; list=0
while [ $# -gt 0 ]; do
  case $1 in
    --full) mode=full ;;
    --jobs) jobs=$2; shift ;;
    --only) only=$2; shift ;;
    --keep) keep=$2; shift ;;
    --junit) junit=$2; shift ;;
    --trace) trace=$2; shift ;;
    --list) list=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

# name|expect|kind|compile|spin flags
#   expect: pass (no violation, exhaustive) or fail:PROPERTY (a counterexample breaking PROPERTY:
#           a VIOLATION name of commit.pml, or "live" for an acceptance cycle)
#   kind: safety (assertions, the committed_restorable monitor) or live (LTL "live", -a)
# The live cases of the quick set split the faults that live_wait used to combine (a crash, a job
# restart, two lost or delayed messages): each pair of them is searched exhaustively here, all of
# them together in full_live_wait_crash_restart_msgs (12.8 million states, 3.2 GB).
W="-DPOLICY_WAIT"
H210="-DCO1=2 -DCO2=1 -DCO3=0"       # the coordinator is node 2 (holds fragments only), then 1, 0
quick_cases() {
  cat <<EOF
safe_wait_crash_restart|pass|safety|-O1|$W -DNS=2 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
safe_coord_holder_delay|pass|safety|-O1|$H210 -DLOCKSTEP $W -DNS=2 -DCRASHMASK=4 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=1 -DMSGKINDS=1
live_wait_crash_restart|pass|live|-O1|-DLOCKSTEP $W -DNS=2 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
safe_two_restarts_msgs|pass|safety|-O1|$W -DNS=2 -DMAXCRASH=0 -DMAXRUN=2 -DMAXMSGF=1 -DMSGKINDS=4
safe_node_loss_restart|pass|safety|-O1|$W -DNS=2 -DMAXLOSS=1 -DMAXCRASH=0 -DMAXRUN=1 -DMAXMSGF=1
safe_node_loss_crash|pass|safety|-O1|-DNS=3 -DMAXLOSS=1 -DMAXCRASH=1 -DMAXRUN=0 -DMAXMSGF=0
safe_coord_crash_state_delay|pass|safety|-O1|-DLOCKSTEP $W -DNS=2 -DCRASHMASK=1 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=1 -DMSGKINDS=2
live_wait_restart_msgs|pass|live|-O1|-DLOCKSTEP $W -DNS=2 -DMAXCRASH=0 -DMAXRUN=1 -DMAXMSGF=2 -DMSGLOSS -DMSGKINDS=7
live_wait_crash_msgs|pass|live|-O1|-DLOCKSTEP $W -DNS=2 -DMAXCRASH=1 -DMAXRUN=0 -DMAXMSGF=2 -DMSGLOSS -DMSGKINDS=7
safe_skip_crash|pass|safety|-O0|-DNS=3 -DMAXCRASH=1 -DMAXRUN=0 -DMAXMSGF=0
safe_zombie|pass|safety|-O0|$H210 $W -DNS=2 -DCRASHMASK=4 -DMAXCRASH=1 -DMAXRUN=0 -DMAXMSGF=2 -DMSGKINDS=6
as_written_dead_first|fail:live|live|-O0|-DPROTOCOL_AS_WRITTEN_DEAD_FIRST -DLOCKSTEP $W -DNS=2 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
as_written_stuck_owner|fail:live|live|-O0|-DPROTOCOL_AS_WRITTEN_STUCK_OWNER -DLOCKSTEP $W -DNS=3 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
bug_no_epoch|fail:no_mix|safety|-O0|-DBUG_NO_EPOCH $H210 -DNS=2 -DMAXRUN=1 -DMAXCRASH=0 -DMAXMSGF=1 -DMSGKINDS=1
bug_partial_view|fail:never_behind|safety|-O0|-DBUG_PARTIAL_VIEW -DLOCKSTEP $W -DNS=2 -DCRASHMASK=1 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=1 -DMSGKINDS=2
bug_release_unprotected|fail:live|live|-O0|-DBUG_RELEASE_UNPROTECTED -DLOCKSTEP $W -DNS=2 -DMAXRUN=0 -DMAXCRASH=0 -DMAXMSGF=0
bug_no_fence|fail:fencing|safety|-O0|-DBUG_NO_FENCE $H210 $W -DNS=2 -DMAXRUN=0 -DMAXCRASH=1 -DMAXMSGF=1 -DMSGKINDS=1
bug_drop_committed|fail:committed_restorable|safety|-O0|-DBUG_DROP_COMMITTED $W -DNS=2 -DMAXRUN=1 -DMAXLOSS=1 -DMAXCRASH=0 -DMAXMSGF=0
as_written|fail:no_mix|safety|-O0|-DPROTOCOL_AS_WRITTEN $W -DNS=2 -DCRASHMASK=1 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
as_written_late_commit|fail:consistent_restart|safety|-O0|-DPROTOCOL_AS_WRITTEN_LATE_COMMIT $H210 -DLOCKSTEP $W -DNS=2 -DCRASHMASK=4 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=1 -DMSGKINDS=1
as_written_epoch_rule|fail:no_mix|safety|-O0|-DPROTOCOL_AS_WRITTEN_EPOCH_RULE $W -DNS=2 -DMAXCRASH=0 -DMAXRUN=2 -DMAXMSGF=0
as_written_epoch_rule_retry|fail:consistent_restart|safety|-O0|-DPROTOCOL_AS_WRITTEN_EPOCH_RULE -DLOCKSTEP $W -DNS=2 -DMAXCRASH=0 -DMAXRUN=2 -DMAXMSGF=1 -DMSGKINDS=4
safe_drop_down_member|pass|safety|-O1|-DMAXDROP=1 $W -DNS=2 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
safe_drop_coord_change|pass|safety|-O1|-DMAXDROP=1 $H210 $W -DNS=2 -DCRASHMASK=2 -DMAXCRASH=1 -DMAXLOSS=1 -DLOSSMASK=4 -DMAXRUN=1 -DMAXMSGF=0
safe_drop_missed|pass|safety|-O1|-DMAXDROP=1 -DLOCKSTEP $W -DNS=2 -DMAXCRASH=0 -DMAXRUN=1 -DMAXMSGF=1 -DMSGKINDS=2
bug_drop_forgotten|fail:drop_final|safety|-O0|-DBUG_DROP_FORGOTTEN -DMAXDROP=1 $H210 $W -DNS=2 -DCRASHMASK=2 -DMAXCRASH=1 -DMAXLOSS=1 -DLOSSMASK=4 -DMAXRUN=1 -DMAXMSGF=0
EOF
}
full_cases() {
  quick_cases
  cat <<EOF
full_wait_crash_restart_delay|pass|safety|-O2|$W -DNS=2 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=1
full_coord_holder_delay|pass|safety|-O2|$H210 $W -DNS=2 -DCRASHMASK=4 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=1 -DMSGKINDS=1
full_coord_holder_state_delay|pass|safety|-O2|$H210 $W -DNS=2 -DCRASHMASK=4 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=1 -DMSGKINDS=2
full_lockstep_skip_crash_restart|pass|safety|-O2|-DLOCKSTEP -DNS=2 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
full_wait_three_steps|pass|safety|-O2|$W -DNS=3 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
full_two_crashes|pass|safety|-O2|-DLOCKSTEP $W -DNS=2 -DMAXCRASH=2 -DMAXRUN=1 -DMAXMSGF=0
full_loss_crash_restart|pass|safety|-O2|$W -DNS=2 -DMAXLOSS=1 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
full_live_three_steps|pass|live|-O2|-DLOCKSTEP $W -DNS=3 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=0
full_live_wait_crash_restart_msgs|pass|live|-O2|-DLOCKSTEP $W -DNS=2 -DMAXCRASH=1 -DMAXRUN=1 -DMAXMSGF=1 -DMSGLOSS -DMSGKINDS=2
EOF
}
cases() { if [ $mode = full ]; then full_cases; else quick_cases; fi; }
selected() {  # the cases to run, as "name|expect|kind|compile|flags" lines
  cases | while IFS='|' read -r name rest; do
    [ -z "$name" ] && continue
    if [ -n "$only" ] && ! echo ",$only," | grep -q ",$name,"; then continue; fi
    echo "$name|$rest"
  done
}

if [ $list = 1 ]; then cases | cut -d'|' -f1-3,5 | tr '|' '\t'; exit 0; fi

missing=""
command -v spin >/dev/null 2>&1 || missing="spin not installed: apt-get install spin"
[ -n "$missing" ] || command -v gcc >/dev/null 2>&1 || missing="gcc not installed: apt-get install gcc"

# --trace NAME: the counterexample of one case, as the model's TRACE lines
if [ -n "$trace" ]; then
  [ -z "$missing" ] || { echo "$missing" >&2; exit 1; }
  line=$(full_cases | grep "^$trace|") || { echo "check.sh: no case $trace" >&2; exit 2; }
  IFS='|' read -r name expect kind opt flags <<<"$line"
  d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
  cp "$model" "$d/" && cd "$d"
  lf=""; [ "$kind" = live ] && lf="-DLIVENESS"
  spin -a $lf $flags commit.pml >/dev/null
  sf="-DSAFETY"; [ "$kind" = live ] && sf=""
  gcc -O1 $sf -DMEMLIM=2000 -o pan pan.c 2>/dev/null
  pa="-m300000"; [ "$kind" = live ] && pa="-a -m300000"
  ./pan $pa >pan.out 2>&1
  if [ ! -f commit.pml.trail ]; then echo "$name: no counterexample"; exit 1; fi
  echo "$name ($flags):"
  spin -t $lf $flags commit.pml 2>&1 | grep -E "TRACE|VIOLATION|START OF CYCLE" | sed 's/^ *//; s/ *$//'
  [ "$kind" = live ] && echo "(from START OF CYCLE on, the system can loop forever without reaching the goal)"
  exit 0
fi

# Without spin or gcc every case is skipped, and says why.
if [ -n "$missing" ]; then
  echo "$missing"
  n=0; xml=""
  while IFS='|' read -r name _; do
    n=$((n+1))
    printf '%-31s SKIP   %s\n' "$name" "$missing"
    xml+="<testcase classname=\"model\" name=\"$name\" time=\"0\"><skipped message=\"$missing\"/></testcase>"
  done < <(selected)
  if [ -n "$junit" ]; then
    echo "<testsuites><testsuite name=\"model\" tests=\"$n\" skipped=\"$n\">$xml</testsuite></testsuites>" >"$junit"
  fi
  echo "0 passed, 0 failed, $n skipped"
  exit 0
fi

[ -n "$jobs" ] || { jobs=$(nproc 2>/dev/null || echo 2); [ $mode = quick ] && [ "$jobs" -gt 2 ] && jobs=2; }
if [ $mode = quick ]; then memlim=1500; limit=300; else memlim=12000; limit=7200; fi
if [ -n "$keep" ]; then work=$keep; mkdir -p "$work"; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi

run_case() {  # name expect kind opt flags
  local name=$1 expect=$2 kind=$3 opt=$4 flags=$5 d=$work/$1
  rm -rf "$d"; mkdir -p "$d"; cp "$model" "$d/"
  local lf="" sf="-DSAFETY" pa="-m300000" t0 t1
  [ "$kind" = live ] && { lf="-DLIVENESS"; sf=""; pa="-a -m300000"; }
  t0=$(date +%s.%N)
  (
    cd "$d" || exit 1
    spin -a $lf $flags commit.pml >spin.out 2>&1 || { echo "spin -a failed" >err; exit 1; }
    gcc $opt $sf -DCOLLAPSE -DMEMLIM=$memlim -o pan pan.c >gcc.out 2>&1 || { echo "gcc failed" >err; exit 1; }
    timeout $limit ./pan $pa >pan.out 2>&1
    echo $? >pan.rc
    if [ -f commit.pml.trail ]; then
      spin -t $lf $flags commit.pml 2>&1 | grep -m1 -oE "VIOLATION [a-z_]+" | sed 's/VIOLATION //' >viol
      [ -s viol ] || { grep -q "acceptance cycle" pan.out && echo live >viol || echo assertion >viol; }
    fi
  )
  t1=$(date +%s.%N)
  echo "$t0 $t1" | awk '{printf "%.1f", $2-$1}' >"$d/wall"
}

order=()
while IFS='|' read -r name expect kind opt flags; do
  order+=("$name")
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  run_case "$name" "$expect" "$kind" "$opt" "$flags" &
done < <(selected)
wait

passed=0; failed=0; skipped=0
printf '%-31s %-6s %-27s %-6s %-30s %10s %10s %6s %8s %7s %7s\n' case kind expect result detail states matched depth "MB" search_s wall_s
xml=""
for name in "${order[@]}"; do
  IFS='|' read -r _ expect kind opt flags < <(cases | grep "^$name|")
  d=$work/$name
  out=$d/pan.out
  states=$(grep -oE '^ *[0-9.e+]+ states, stored' "$out" 2>/dev/null | awk '{print $1}')
  matched=$(grep -oE '^ *[0-9.e+]+ states, matched' "$out" 2>/dev/null | awk '{print $1}')
  depth=$(grep -oE 'depth reached [0-9]+' "$out" 2>/dev/null | awk '{print $3}')
  mem=$(grep -E 'total actual memory usage' "$out" 2>/dev/null | awk '{print $1}')
  secs=$(grep -oE 'elapsed time [0-9.e+]+' "$out" 2>/dev/null | awk '{print $3}')
  errs=$(grep -oE 'errors: [0-9]+' "$out" 2>/dev/null | awk '{print $2}')
  viol=$(cat "$d/viol" 2>/dev/null)
  incomplete=0
  grep -qE 'Search not completed|max search depth too small|reached -DMEMLIM|out of memory' "$out" 2>/dev/null && incomplete=1
  [ "$(cat "$d/pan.rc" 2>/dev/null)" = 124 ] && incomplete=1
  result=FAIL; detail=""
  if [ -f "$d/err" ]; then
    detail=$(cat "$d/err")
  elif [ "$expect" = pass ]; then
    if [ "${errs:-x}" = 0 ] && [ $incomplete = 0 ]; then result=PASS; detail="exhaustive, no violation"
    elif [ "${errs:-0}" != 0 ]; then detail="violation: ${viol:-?}"
    else detail="incomplete (time or memory)"; fi
  else
    if [ -n "$errs" ] && [ "$errs" != 0 ] && [ "fail:$viol" = "$expect" ]; then result=PASS; detail="fails: $viol"
    elif [ -n "$errs" ] && [ "$errs" != 0 ]; then detail="fails, but: ${viol:-?}"
    else detail="no counterexample found"; fi
  fi
  if [ $result = PASS ]; then passed=$((passed+1)); else failed=$((failed+1)); fi
  printf '%-31s %-6s %-27s %-6s %-30s %10s %10s %6s %8s %7s %7s\n' "$name" "$kind" "$expect" "$result" "$detail" \
    "${states:--}" "${matched:--}" "${depth:--}" "${mem:--}" "${secs:--}" "$(cat "$d/wall" 2>/dev/null)"
  if [ -n "$junit" ]; then
    xml+="<testcase classname=\"model\" name=\"$name\" time=\"$(cat "$d/wall" 2>/dev/null || echo 0)\">"
    [ $result = PASS ] || xml+="<failure message=\"$detail\"/>"
    xml+="</testcase>"
  fi
done
if [ -n "$junit" ]; then
  echo "<testsuites><testsuite name=\"model\" tests=\"${#order[@]}\" failures=\"$failed\">$xml</testsuite></testsuites>" >"$junit"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ $failed = 0 ]
