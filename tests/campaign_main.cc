// The fault campaign from the command line (tools/campaign.sh runs it from its runfiles):
//
//   fault_campaign [--trials=N] [--seed=S] [--min-faults=3] [--max-faults=6]
//                  [--script=kind,kind,...] [--keep-logs=DIR] [--no-partitions]
//                  [--skip-when-busy] [--progress-deadline-s=60] [--budget-s=0]
//                  [--tls=drawn|on|off]
//
// Trial i runs with seed S + i; a failing trial is rerun alone with --seed=<its seed> --trials=1.
// --budget-s starts no trial after that many seconds (0: no limit).
// Fault kinds: trainer-kill rank-restart daemon-kill node-loss flip-fragment flip-slot
// daemon-stop zombie job-restart partition partition-restart link-cut. --skip-when-busy makes
// the trainers skip a snapshot while the previous one is in flight instead of waiting. --tls:
// mutual TLS between the daemons in half the trials (drawn, the default), in all or in none.
// Exits 0 when every trial passed, 1 otherwise.
#include <signal.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "tests/campaign.h"

int main(int argc, char** argv) {
  using tessera::testing::FaultKind;
  // Run from anywhere: the daemon and the trainer are found in this binary's runfiles.
  if (std::getenv("TEST_SRCDIR") == nullptr) {
    char self[4096];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) {
      self[n] = '\0';
      setenv("TEST_SRCDIR", (std::string(self) + ".runfiles").c_str(), 1);
      setenv("TEST_WORKSPACE", "tessera", 1);
    }
  }
  tessera::testing::TrialOptions options;
  uint64_t seed = std::random_device{}() * uint64_t{1000003} + std::random_device{}();
  seed %= 1000000000;  // short enough to type
  int trials = 10;
  double budget_s = 0;
  bool partitions = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* name, std::string* out) {
      const std::string prefix = std::string("--") + name + "=";
      if (!absl::StartsWith(arg, prefix)) return false;
      *out = arg.substr(prefix.size());
      return true;
    };
    std::string v;
    bool ok = true;
    if (value("trials", &v)) {
      ok = absl::SimpleAtoi(v, &trials) && trials > 0;
    } else if (value("seed", &v)) {
      ok = absl::SimpleAtoi(v, &seed);
    } else if (value("min-faults", &v)) {
      ok = absl::SimpleAtoi(v, &options.min_faults) && options.min_faults >= 0;
    } else if (value("max-faults", &v)) {
      ok = absl::SimpleAtoi(v, &options.max_faults);
    } else if (value("script", &v)) {
      for (absl::string_view name : absl::StrSplit(v, ',', absl::SkipEmpty())) {
        FaultKind kind;
        ok = ok && tessera::testing::ParseFaultKind(std::string(name), &kind);
        options.script.push_back(kind);
      }
    } else if (value("progress-deadline-s", &v)) {
      ok = absl::SimpleAtoi(v, &options.progress_deadline_s) && options.progress_deadline_s > 0;
    } else if (value("budget-s", &v)) {
      ok = absl::SimpleAtod(v, &budget_s) && budget_s >= 0;
    } else if (value("tls", &v)) {
      ok = v == "drawn" || v == "on" || v == "off";
      options.tls = v;
    } else if (value("keep-logs", &v)) {
      options.keep_logs_dir = v;
    } else if (arg == "--no-partitions") {
      partitions = false;
    } else if (arg == "--skip-when-busy") {
      options.skip_when_busy = true;
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr,
                   "usage: fault_campaign [--trials=N] [--seed=S] [--min-faults=N] "
                   "[--max-faults=N] [--script=kind,...] [--keep-logs=DIR] [--no-partitions] "
                   "[--skip-when-busy] [--progress-deadline-s=N] [--budget-s=N] "
                   "[--tls=drawn|on|off]\n"
                   "bad argument: %s\n",
                   arg.c_str());
      return 2;
    }
  }
  if (options.max_faults < options.min_faults) options.max_faults = options.min_faults;
  signal(SIGPIPE, SIG_IGN);
  options.no_partitions =
      partitions ? tessera::testing::ProbePartitions() : "turned off by --no-partitions";
  std::printf("fault campaign: %d trial(s) from seed %" PRIu64 "; partitions: %s\n", trials, seed,
              options.no_partitions.empty() ? "by network namespaces"
                                            : ("skipped: " + options.no_partitions).c_str());
  const auto results = tessera::testing::RunCampaign(seed, trials, budget_s, options);
  for (const auto& r : results) {
    if (!r.failures.empty()) return 1;
  }
  return 0;
}
