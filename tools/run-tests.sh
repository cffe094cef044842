#!/usr/bin/env bash
# Runs every test (Bazel's C++ unit and multi-process tests, the Python tests, the model check of
# the commit protocol, then the fuzzers for a short while) and ends with one line, alone:
# "N passed, N failed, N skipped", counted from the test cases' XML reports.
set -uo pipefail
cd "$(dirname "$0")/.."

reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT

bazel test //... --keep_going --test_output=errors --test_summary=terse
bazel_rc=$?
# Count only the current test targets (bazel-testlogs keeps results of deleted ones).
for target in $(bazel query 'tests(//...) except attr(tags, manual, //...)' 2>/dev/null); do
  path=${target#//}
  path=${path/://}
  xml="bazel-testlogs/$path/test.xml"
  if [ -f "$xml" ]; then
    cp "$xml" "$reports/$(echo "$path" | tr '/' '_').xml"
  else
    echo "<testsuites><testsuite><testcase name=\"$target\"><failure message=\"no report: the target did not build or run\"/></testcase></testsuite></testsuites>" \
      > "$reports/$(echo "$path" | tr '/' '_').xml"
  fi
done

python_rc=0
if [ -d tests/python ] && ls tests/python/test_*.py >/dev/null 2>&1; then
  TESSERAD=$PWD/bazel-bin/daemon/tesserad TESSERA_LIBRARY=$PWD/bazel-bin/agent/libtessera.so \
    /usr/bin/python3 -m pytest -q -rs tests/python --junitxml="$reports/python.xml"
  python_rc=$?
  [ $python_rc -eq 5 ] && python_rc=0  # no tests collected is not a failure of this script
fi

# The commit protocol's model (docs/PROTOCOL.md, "Model check"): spin's verifiers are built with
# gcc and run here, outside Bazel's sandbox. Without spin every case is skipped, saying
# "apt-get install spin".
model/check.sh --junit "$reports/model.xml"
model_rc=$?

# The fuzzers (fuzz/README.md), about 15 s each from their seeds and the inputs earlier runs
# found: segment headers, manifests, data-path frames (plain, and the encrypted path's handshake
# and records), every RPC's request, and signed membership datagrams with their incarnation
# proofs. tools/fuzz.sh
# --seconds N runs them longer. Without clang++-14 every target is skipped, saying why.
tools/fuzz.sh --seconds 15 --junit "$reports/fuzz.xml"
fuzz_rc=$?

/usr/bin/python3 - "$reports" "$bazel_rc" "$python_rc" "$model_rc" "$fuzz_rc" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
failures = []  # (where, what): repeated at the end, where a truncated log still shows them
for path in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    for case in ET.parse(path).getroot().iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            failed += 1
            what = (problem.text or "").strip() or problem.get("message") or ""
            where = case.get("classname", "") + "." + case.get("name", "")
            failures.append((where.strip("."), what.strip()))
        elif case.find("skipped") is not None or case.get("result") == "skipped" or case.get("status") == "notrun":
            skipped += 1
        else:
            passed += 1
bazel_rc, python_rc, model_rc, fuzz_rc = (int(a) for a in sys.argv[2:6])
if failed == 0 and (bazel_rc != 0 or python_rc != 0 or model_rc != 0 or fuzz_rc != 0):
    failed = 1  # a runner failed without a test case saying so (e.g. a build error)
for where, what in failures:
    lines = what.splitlines()
    print(f"FAILED {where}:")
    for line in lines[:40]:
        print(f"    {line[:300]}")
    if len(lines) > 40:
        print(f"    ... {len(lines) - 40} more lines in its test log")
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
PY
