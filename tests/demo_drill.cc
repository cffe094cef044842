// The multi-node drill run by `make demo` (tools/demo.sh): real tesserad daemons on loopback, each
// a simulated node with its own peer port and shm directory, clustered with Reed-Solomon RS(k, m),
// and real trainer processes (tests/trainer) that check every byte of what they restore.
//
//   1. the nodes start and hear each other;
//   2. trainers (ranks_per_node per node) snapshot every `every` steps, the same steps on every
//      rank; each shard is encoded into k + m fragments on other nodes, and the first step
//      protected on every rank is committed;
//   3. a trainer is SIGKILLed and restarted: it restores from its node's memory;
//   4. a daemon is SIGKILLed and restarted (memory kept): it re-adopts its snapshots, its trainers
//      re-register, and protection and commits go on;
//   5. `lost` nodes (at most m) are lost at once: their daemons SIGKILLed and their shm
//      directories deleted; the job's trainers are stopped, as a launcher stops a job that lost a
//      node; the peers suspect the lost nodes;
//   6. a replacement daemon starts on each lost node, empty, a new incarnation;
//   7. the job restarts on the same nodes: every rank restores the same step, at least the newest
//      committed one, bit-exact; the lost nodes' ranks are rebuilt from k fragments on the
//      replacements; then the job trains on;
//   8. fresh processes check every rank bit-exact once more.
//
// Prints what happens as it goes, then a table of the phases and their durations. Exits 0 when
// every check passed, 1 with the reason otherwise.
//
// Run from the runfiles directory (tools/demo.sh does): demo_drill [--nodes=6] [--k=3] [--m=2]
//   [--ranks_per_node=2] [--lost=2] [--rank_mib=8] [--every=10] [--step_sleep_ms=40] [--seed=N] [--keep]
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tests/harness.h"

namespace tessera::testing {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr char kJob[] = "drill";

struct Flags {
  int nodes = 6;
  int k = 3;
  int m = 2;
  int ranks_per_node = 2;
  int lost = 2;  // nodes lost at once (at most m)
  uint64_t rank_mib = 8;
  uint64_t every = 10;  // a snapshot every `every` steps, the same steps on every rank
  uint64_t step_sleep_ms = 40;
  uint64_t seed = 0;
  bool seed_set = false;
  bool keep = false;  // a failed drill keeps its logs (the directory is printed)
};

// Set while a drill runs: Fail() stops its processes and removes its directory before exiting.
std::function<void()> g_cleanup;

// SIGINT, SIGTERM or SIGHUP: the drill fails at its next wait, stopping what it started.
volatile sig_atomic_t g_interrupted = 0;
void OnSignal(int) { g_interrupted = 1; }

// A failed check ends the drill: prints why, stops every process it started, exits 1.
[[noreturn]] void Fail(const std::string& why) {
  std::printf("\nDRILL FAILED: %s\n", why.c_str());
  std::fflush(stdout);
  if (g_cleanup) g_cleanup();
  std::exit(1);
}

// The newest match of `pattern`'s first group (a number) in `text`, -1 if none.
int64_t NewestNumber(const std::string& text, const std::string& pattern) {
  const std::regex re(pattern);
  int64_t newest = -1;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator();
       ++it) {
    newest = std::max<int64_t>(newest, std::stoll((*it)[1].str()));
  }
  return newest;
}

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f s", s);
  return buf;
}

class Drill {
 public:
  Drill(const Flags& flags, const std::string& root)
      : flags_(flags), root_(root), token_file_(root + "/cluster.token") {
    // The cluster authenticates, as every cluster must: a fresh random token, in a file only
    // this user reads (cluster.token_file).
    {
      std::random_device random;
      std::string token;
      for (int i = 0; i < 32; ++i) token.push_back("0123456789abcdef"[random() % 16]);
      std::ofstream(token_file_) << token << "\n";
      chmod(token_file_.c_str(), 0600);
    }
    for (int i = 0; i < flags_.nodes; ++i) {
      addresses_.push_back(absl::StrCat("127.0.0.1:", FreePort()));
    }
    for (int i = 0; i < flags_.nodes; ++i) daemons_.push_back(MakeDaemon(i));
    trainers_.resize(Ranks());
    start_ = Clock::now();
  }

  void Run() {
    const uint64_t fragment_mib_x10 = flags_.rank_mib * 10 / flags_.k;
    std::printf(
        "Tessera drill: %d nodes (tesserad daemons on loopback, each its own peer port and shm "
        "directory), RS(%d, %d), job '%s' with %d ranks (%d per node) of about %llu MiB each, a "
        "snapshot every %llu steps; seed %llu\n\n",
        flags_.nodes, flags_.k, flags_.m, kJob, Ranks(), flags_.ranks_per_node,
        static_cast<unsigned long long>(flags_.rank_mib),
        static_cast<unsigned long long>(flags_.every),
        static_cast<unsigned long long>(flags_.seed));

    // 1. Nodes.
    auto t = Clock::now();
    for (int i = 0; i < flags_.nodes; ++i) StartDaemon(i);
    for (int i = 0; i < flags_.nodes; ++i) WaitForPeers(i, flags_.nodes - 1, seconds(20));
    Row("1. start the nodes", t,
        absl::StrCat(flags_.nodes, " daemons up, each hears the other ", flags_.nodes - 1));

    // 2. Training with cross-node protection.
    t = Clock::now();
    for (int r = 0; r < Ranks(); ++r) StartTrainer(r, "train");
    const int64_t first = WaitForCommit(0, seconds(90));
    WaitFor(seconds(30), "every trainer to report its sealed steps", [&] {
      for (auto& trainer : trainers_) {
        if (LastEvent(trainer->lines(), "sealed") < first) return false;
      }
      return true;
    });
    Row("2. train until a step is protected", t,
        absl::StrCat("step ", first, " committed: every rank's shard in ", flags_.k + flags_.m,
                     " fragments of ", fragment_mib_x10 / 10, ".", fragment_mib_x10 % 10,
                     " MiB on other nodes"));

    // 3. A trainer crashes.
    t = Clock::now();
    const int crash_rank = 1 % flags_.nodes;
    Pump();
    const int64_t sealed_at_kill = LastEvent(trainers_[crash_rank]->lines(), "sealed");
    const int64_t committed_at_kill = Committed(0);
    trainers_[crash_rank]->Signal(SIGKILL);
    trainers_[crash_rank]->Wait();
    Say(absl::StrCat("trainer of rank ", crash_rank, " SIGKILLed; it had sealed step ",
                     sealed_at_kill, ", the job had committed step ", committed_at_kill));
    StartTrainer(crash_rank, "train");
    const auto [resumed, restore_ms] = WaitForResume(crash_rank, seconds(60));
    if (resumed < committed_at_kill) {
      Fail(absl::StrCat("rank ", crash_rank, " resumed step ", resumed, ", older than step ",
                        committed_at_kill, " committed before the kill"));
    }
    Row("3. trainer SIGKILL, restart", t,
        absl::StrCat("rank ", crash_rank, " resumed step ", resumed, " bit-exact (restore ",
                     restore_ms, " ms)"));

    // 4. A daemon crashes; its node keeps its memory.
    t = Clock::now();
    const int crashed = 2 % flags_.nodes;
    Pump();
    const int64_t sealed_before = LastEvent(trainers_[crashed]->lines(), "sealed");
    const int64_t committed_before = Committed(0);
    daemons_[crashed]->Kill(SIGKILL);
    Say(absl::StrCat("tesserad n", crashed, " SIGKILLed; rank ", crashed, " had sealed step ",
                     sealed_before, " and keeps training"));
    const auto restart = Clock::now();
    StartDaemon(crashed);
    const double restart_s = Since(restart);
    const std::string readopted = NewestMatch(
        ReadFile(daemons_[crashed]->log_path()), "([0-9]+ snapshots re-adopted)");
    Say(absl::StrCat("tesserad n", crashed, " restarted in ", Seconds(restart_s), ": ",
                     readopted));
    WaitFor(seconds(60), absl::StrCat("rank ", crashed, " to seal a step after the restart"), [&] {
      return LastEvent(trainers_[crashed]->lines(), "sealed") > sealed_before;
    });
    const int64_t recommitted = WaitForCommit(committed_before + 1, seconds(90));
    Row("4. daemon SIGKILL, restart", t,
        absl::StrCat("n", crashed, " back in ", Seconds(restart_s), ", ", readopted, "; rank ",
                     crashed, " sealed step ", LastEvent(trainers_[crashed]->lines(), "sealed"),
                     ", step ", recommitted, " committed"));

    // 5. Nodes are lost with their memory. Their ranks' trainers die with them; the launcher
    // then stops the job's other trainers.
    t = Clock::now();
    std::vector<int> lost;
    for (int i = 0; i < flags_.lost; ++i) lost.push_back(1 + i * flags_.nodes / flags_.lost);
    const std::string lost_names = NodeNames(lost);
    const size_t log_mark = ReadFile(daemons_[0]->log_path()).size();
    uintmax_t removed = 0;
    for (int node : lost) {
      for (int r = node; r < Ranks(); r += flags_.nodes) trainers_[r]->Signal(SIGKILL);
      daemons_[node]->Kill(SIGKILL);
      std::error_code ec;
      removed += std::filesystem::remove_all(daemons_[node]->store_dir(), ec);
      if (ec) Fail("deleting " + daemons_[node]->store_dir() + ": " + ec.message());
    }
    for (auto& trainer : trainers_) {
      trainer->Signal(SIGKILL);
      trainer->Wait();
    }
    Say(absl::StrCat(lost_names, " lost: tesserad SIGKILLed, shm directories deleted (", removed,
                     " files); the job's trainers stopped"));
    for (int node : lost) {
      const std::regex suspected("member n" + std::to_string(node) + " at [^ ]+ suspected");
      WaitFor(seconds(30), absl::StrCat("n0 to suspect n", node), [&] {
        const std::string log = ReadFile(daemons_[0]->log_path());
        return std::regex_search(log.substr(std::min(log_mark, log.size())), suspected);
      });
    }
    const int64_t committed_at_loss = Committed(0);
    Row(absl::StrCat("5. ", lost.size(), " node(s) lost, detected"), t,
        absl::StrCat(lost_names, " suspected by n0; newest committed step ", committed_at_loss));

    // 6. Replacements join.
    t = Clock::now();
    for (int node : lost) {
      daemons_[node] = MakeDaemon(node);
      StartDaemon(node);
    }
    for (int node : lost) {
      WaitForPeers(node, flags_.nodes - 1, seconds(20));
      const std::regex back("member n" + std::to_string(node) +
                            " at [^ ]+ (restarted|is alive again|joined)");
      WaitFor(seconds(20), absl::StrCat("n0 to see the replacement of n", node), [&] {
        const std::string log = ReadFile(daemons_[0]->log_path());
        return std::regex_search(log.substr(std::min(log_mark, log.size())), back);
      });
    }
    Row("6. replacement daemons", t,
        absl::StrCat(lost_names, " started empty, new incarnations, heard by their peers"));

    // 7. The job restarts on the same nodes; the lost nodes' ranks are rebuilt there.
    t = Clock::now();
    for (int r = 0; r < Ranks(); ++r) {
      StartTrainer(r, "train", /*steps=*/2 * static_cast<int>(flags_.every));
    }
    std::set<int64_t> resumed_steps;
    int64_t slowest_rebuilt_restore_ms = 0;
    for (int r = 0; r < Ranks(); ++r) {
      const auto [step, ms] = WaitForResume(r, seconds(90));
      resumed_steps.insert(step);
      if (IsLost(lost, r)) slowest_rebuilt_restore_ms = std::max(slowest_rebuilt_restore_ms, ms);
    }
    const double restored_s = Since(t);
    if (resumed_steps.size() != 1) {
      Fail("the ranks resumed different steps: " + absl::StrJoin(resumed_steps, ", "));
    }
    const int64_t restored = *resumed_steps.begin();
    if (restored < committed_at_loss) {
      Fail(absl::StrCat("the job resumed step ", restored, ", older than step ", committed_at_loss,
                        " committed before the loss"));
    }
    int rebuilt_ranks = 0;
    std::string rebuilt_example;
    for (int r = 0; r < Ranks(); ++r) {
      if (!IsLost(lost, r)) continue;
      const int node = r % flags_.nodes;
      const std::string rebuilt = NewestMatch(
          ReadFile(daemons_[node]->log_path()),
          absl::StrCat("rank ", r, " step ", restored,
                       ": (rebuilt from [0-9]+ of [0-9]+ fragments \\([0-9]+ bytes\\) in "
                       "[0-9]+ ms)"));
      if (rebuilt.empty()) {
        Fail(absl::StrCat("n", node, "'s log does not say that rank ", r, " step ", restored,
                          " was rebuilt; its tail:\n", daemons_[node]->LogTail()));
      }
      Say(absl::StrCat("rank ", r, " on the replacement n", node, ": ", rebuilt));
      ++rebuilt_ranks;
      if (rebuilt_example.empty()) rebuilt_example = rebuilt;
    }
    for (int r = 0; r < Ranks(); ++r) {
      if (trainers_[r]->Wait(seconds(60)) != 0) {
        Fail(absl::StrCat("rank ", r, " did not finish its steps after the restore: ",
                          absl::StrJoin(trainers_[r]->lines(), " | ")));
      }
    }
    Row("7. job restart, lost ranks rebuilt", t,
        absl::StrCat(Ranks(), " ranks resumed step ", restored, " bit-exact in ",
                     Seconds(restored_s), "; the ", rebuilt_ranks, " ranks of ", lost_names,
                     " each ", rebuilt_example.substr(0, rebuilt_example.find(" (")),
                     " (slowest restore ", slowest_rebuilt_restore_ms, " ms), then trained ",
                     2 * flags_.every, " steps"));

    // 8. Every rank once more from a fresh process.
    t = Clock::now();
    std::set<int64_t> verified;
    for (int r = 0; r < Ranks(); ++r) {
      StartTrainer(r, "verify");
      if (trainers_[r]->Wait(seconds(60)) != 0) {
        Fail(absl::StrCat("rank ", r, " verify: ", absl::StrJoin(trainers_[r]->lines(), " | ")));
      }
      const int64_t v = LastEvent(trainers_[r]->lines(), "verified");
      if (v < restored) Fail(absl::StrCat("rank ", r, " verified step ", v, " < ", restored));
      verified.insert(v);
    }
    Row("8. fresh processes verify", t,
        absl::StrCat(Ranks(), " ranks bit-exact at step ", absl::StrJoin(verified, "/")));

    PrintTable();
  }

  // SIGKILLs every trainer and daemon still running.
  void Stop() {
    for (auto& t : trainers_) t.reset();
    for (auto& d : daemons_) d.reset();
  }

 private:
  int Ranks() const { return flags_.nodes * flags_.ranks_per_node; }
  bool IsLost(const std::vector<int>& lost, int rank) const {
    return std::find(lost.begin(), lost.end(), rank % flags_.nodes) != lost.end();
  }
  static std::string NodeNames(const std::vector<int>& nodes) {
    std::vector<std::string> names;
    for (int n : nodes) names.push_back(absl::StrCat("n", n));
    return absl::StrJoin(names, " and ");
  }

  std::unique_ptr<DaemonProcess> MakeDaemon(int i) {
    return std::make_unique<DaemonProcess>(
        root_, absl::StrCat("n", i), uint64_t{1} << 30,
        std::vector<std::string>{"--set", "peer.listen_address=" + addresses_[i],
                                 "--set", "cluster.members=" + absl::StrJoin(addresses_, ","),
                                 "--set", "cluster.token_file=" + token_file_,
                                 "--set", absl::StrCat("ec.k=", flags_.k),
                                 "--set", absl::StrCat("ec.m=", flags_.m),
                                 "--set", "liveness.heartbeat_ms=100",
                                 "--set", "liveness.timeout_ms=1000"});
  }

  void StartDaemon(int i) {
    std::string error;
    if (!daemons_[i]->Start(&error)) Fail(absl::StrCat("tesserad n", i, ": ", error));
  }

  // Waits until node i's log says, since its newest start, that it heard `peers` members.
  void WaitForPeers(int i, int peers, Clock::duration timeout) {
    WaitFor(timeout, absl::StrCat("n", i, " to hear its peers"), [&] {
      const std::string log = ReadFile(daemons_[i]->log_path());
      // Log lines carry the daemon's pid: the newest start is the pid of the last "ready".
      const std::string pid = NewestMatch(log, " ([0-9]+) \\[daemon\\] tesserad n[0-9]+ ready: ");
      if (pid.empty()) return false;
      std::set<std::string> heard;
      const std::regex re(" " + pid +
                          " \\[cluster\\] member (n[0-9]+) at [^ ]+ (joined|is alive again|restarted)");
      for (auto it = std::sregex_iterator(log.begin(), log.end(), re);
           it != std::sregex_iterator(); ++it) {
        heard.insert((*it)[1].str());
      }
      return static_cast<int>(heard.size()) >= peers;
    });
  }

  void StartTrainer(int rank, const std::string& mode, int steps = 0) {
    std::vector<std::string> argv = {
        BinaryPath("tests/trainer"),
        "--socket=" + daemons_[rank % flags_.nodes]->socket_path(),
        std::string("--job=") + kJob,
        absl::StrCat("--seed=", flags_.seed + rank),
        absl::StrCat("--rank=", rank),
        absl::StrCat("--world=", Ranks()),
        "--tensors=12",  // sizes log-uniform in [total/24, total/6]: about `rank_mib` in all
        absl::StrCat("--min-bytes=", (flags_.rank_mib << 20) / 24),
        absl::StrCat("--max-bytes=", (flags_.rank_mib << 20) / 6),
        absl::StrCat("--total-bytes=", flags_.rank_mib << 20),
        "--mode=" + mode,
        // A rank whose previous snapshot is still in flight waits instead of skipping, as the
        // ranks of a synchronous job do: every rank snapshots the same steps, so steps commit.
        "--when-busy=wait",
        absl::StrCat("--every=", flags_.every),
        absl::StrCat("--step-sleep-ms=", flags_.step_sleep_ms)};
    if (steps > 0) argv.push_back(absl::StrCat("--steps=", steps));
    trainers_[rank] = Process::Start(argv, absl::StrCat(root_, "/rank", rank, ".err"));
    if (!trainers_[rank]) Fail("cannot start a trainer");
  }

  // Waits for the trainer of `rank` to restore: (step, restore_ms). A trainer that starts fresh
  // or reports an error fails the drill.
  std::pair<int64_t, int64_t> WaitForResume(int rank, Clock::duration timeout) {
    auto line = trainers_[rank]->ReadUntil(
        [](const std::string& l) {
          return absl::StartsWith(l, "resumed ") || l == "fresh" || absl::StartsWith(l, "error");
        },
        std::chrono::duration_cast<milliseconds>(timeout));
    if (!line) {
      Fail(absl::StrCat("rank ", rank, " did not restore in time: ",
                        absl::StrJoin(trainers_[rank]->lines(), " | "), "\nits daemon's log:\n",
                        daemons_[rank % flags_.nodes]->LogTail()));
    }
    if (!absl::StartsWith(*line, "resumed ")) {
      Fail(absl::StrCat("rank ", rank, " could not restore: ", *line, "\nits daemon's log:\n",
                        daemons_[rank % flags_.nodes]->LogTail()));
    }
    return {LastEvent(trainers_[rank]->lines(), "resumed"),
            LastEvent(trainers_[rank]->lines(), "restore_ms")};
  }

  int64_t Committed(int node) {
    return NewestNumber(ReadFile(daemons_[node]->log_path()),
                        std::string("job '") + kJob + "' committed step ([0-9]+)");
  }

  // Waits until node 0 has committed a step >= at_least; returns it.
  int64_t WaitForCommit(int64_t at_least, Clock::duration timeout) {
    int64_t committed = -1;
    WaitFor(timeout, absl::StrCat("a commit of step ", at_least, " or newer"), [&] {
      committed = Committed(0);
      return committed >= at_least;
    });
    return committed;
  }

  // Polls `done` every 20 ms, reading the trainers' output meanwhile (their pipes must not fill).
  template <typename Done>
  void WaitFor(Clock::duration timeout, const std::string& what, Done done) {
    const auto deadline = Clock::now() + timeout;
    while (true) {
      Pump();
      for (size_t r = 0; r < trainers_.size(); ++r) {
        if (!trainers_[r]) continue;
        for (const auto& l : trainers_[r]->lines()) {
          if (absl::StartsWith(l, "error")) Fail(absl::StrCat("rank ", r, ": ", l));
        }
      }
      if (done()) return;
      if (g_interrupted) Fail("interrupted");
      if (Clock::now() >= deadline) {
        Fail(absl::StrCat("timed out waiting for ", what, "; n0's log:\n", daemons_[0]->LogTail()));
      }
      std::this_thread::sleep_for(milliseconds(20));
    }
  }

  // Reads what the trainers have printed (a few ms per trainer that printed nothing new).
  void Pump() {
    for (auto& t : trainers_) {
      if (!t) continue;
      for (size_t before = ~size_t{0}; before != t->lines().size();) {
        before = t->lines().size();
        t->ReadUntil([](const std::string&) { return false; }, milliseconds(3));
      }
    }
  }

  static std::string NewestMatch(const std::string& text, const std::string& pattern) {
    const std::regex re(pattern);
    std::string newest;
    for (auto it = std::sregex_iterator(text.begin(), text.end(), re);
         it != std::sregex_iterator(); ++it) {
      newest = (*it)[1].str();
    }
    return newest;
  }

  static double Since(Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  }

  void Say(const std::string& what) {
    std::printf("[%7.2fs] %s\n", Since(start_), what.c_str());
    std::fflush(stdout);
  }

  void Row(const std::string& phase, Clock::time_point t, const std::string& result) {
    rows_.push_back({phase, Since(t), result});
    Say(phase + ": " + result);
  }

  void PrintTable() {
    std::printf("\n%-36s %9s  %s\n", "phase", "took", "result");
    std::printf("%s\n", std::string(120, '-').c_str());
    for (const auto& row : rows_) {
      std::printf("%-36s %9s  %s\n", row.phase.c_str(), Seconds(row.seconds).c_str(),
                  row.result.c_str());
    }
    std::printf("%-36s %9s\n", "total", Seconds(Since(start_)).c_str());
  }

  struct TableRow {
    std::string phase;
    double seconds;
    std::string result;
  };

  const Flags flags_;
  const std::string root_;
  const std::string token_file_;
  std::vector<std::string> addresses_;
  std::vector<std::unique_ptr<DaemonProcess>> daemons_;
  std::vector<std::unique_ptr<Process>> trainers_;
  std::vector<TableRow> rows_;
  Clock::time_point start_;
};

}  // namespace
}  // namespace tessera::testing

int main(int argc, char** argv) {
  tessera::testing::Flags flags;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto number = [&](const char* name, uint64_t* out) {
      const std::string prefix = std::string("--") + name + "=";
      return absl::StartsWith(arg, prefix) && absl::SimpleAtoi(arg.substr(prefix.size()), out);
    };
    uint64_t v = 0;
    if (number("nodes", &v) && v >= 2 && v <= 32) {
      flags.nodes = static_cast<int>(v);
    } else if (number("k", &v) && v >= 1) {
      flags.k = static_cast<int>(v);
    } else if (number("m", &v) && v >= 1) {
      flags.m = static_cast<int>(v);
    } else if (number("rank_mib", &v) && v >= 1) {
      flags.rank_mib = v;
    } else if (number("ranks_per_node", &v) && v >= 1 && v <= 8) {
      flags.ranks_per_node = static_cast<int>(v);
    } else if (number("lost", &v) && v >= 1) {
      flags.lost = static_cast<int>(v);
    } else if (number("every", &v) && v >= 1) {
      flags.every = v;
    } else if (number("step_sleep_ms", &v)) {
      flags.step_sleep_ms = v;
    } else if (arg == "--keep") {
      flags.keep = true;
    } else if (number("seed", &v)) {
      flags.seed = v;
      flags.seed_set = true;
    } else {
      std::fprintf(stderr,
                   "usage: demo_drill [--nodes=6] [--k=3] [--m=2] [--ranks_per_node=2] [--lost=2] "
                   "[--rank_mib=8] [--every=10] "
                   "[--step_sleep_ms=40] [--seed=N] [--keep]\n");
      return 2;
    }
  }
  if (flags.lost > flags.m || flags.lost >= flags.nodes - 1) {
    std::fprintf(stderr, "demo_drill: --lost must be at most m and leave n0 and another node\n");
    return 2;
  }
  if (flags.k + flags.m >= flags.nodes) {
    std::fprintf(stderr, "demo_drill: RS(%d, %d) needs at least %d nodes\n", flags.k, flags.m,
                 flags.k + flags.m + 1);
    return 2;
  }
  if (!flags.seed_set) {
    const char* env = std::getenv("TESSERA_TEST_SEED");
    flags.seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  }
  signal(SIGPIPE, SIG_IGN);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) signal(sig, tessera::testing::OnSignal);
  tessera::testing::TempRoot root;
  if (root.path().empty()) {
    std::fprintf(stderr, "demo_drill: cannot create a directory under /dev/shm\n");
    return 1;
  }
  {
    tessera::testing::Drill drill(flags, root.path());
    tessera::testing::g_cleanup = [&drill, &root, &flags] {
      drill.Stop();
      if (flags.keep) {
        std::printf("logs kept in %s\n", root.path().c_str());
        std::exit(1);  // TempRoot's destructor would remove them
      }
      std::error_code ec;
      std::filesystem::remove_all(root.path(), ec);
    };
    drill.Run();
    tessera::testing::g_cleanup = nullptr;
  }
  std::printf("\nDrill passed: every check held, every restored byte matched.\n");
  return 0;
}
