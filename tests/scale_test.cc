// A large cluster on loopback: 64 real tesserad processes, one per simulated node (64 MiB stores,
// metrics on, defaults otherwise), started all at once, in measured phases:
//   a. membership converges: one sweep in which every daemon's own admin status (GetStatus,
//      local_only, over its agent socket, as the CLI asks) lists every other member ALIVE,
//      within 60 s + 3 s per daemon (if not, the test fails and b still measures them);
//   b. idle cost over 20 s: CPU of all daemons (utime + stime from /proc/<pid>/stat), sockets and
//      threads per daemon (sampled every second), and membership messages per daemon per second
//      from tessera_membership_messages_total on /metrics where the daemon exports it;
//   c. a job of one trainer per node (tests/trainer, 256 KiB shards, --when-busy=wait) seals
//      step 3 on every rank, and every daemon protects its rank and commits the step; from the
//      daemons' logs, the time from the last seal (a "protected ... D ms after it was sealed"
//      line, less D) to the last rank protected, and to the first and the last "committed step";
//   d. (64 only) a node is lost (SIGKILL, its store deleted), a replacement starts with the same
//      id and address, and the lost rank restores on it bit-exact, rebuilt from fragments.
// Phases a to c run first with 8 daemons, so that each figure can be compared with 64.
//
// Only correctness is asserted, with generous deadlines against hangs; the figures are printed
// as a table. TESSERA_SCALE_BENCH=1 (bench/scale_bench.sh) prints them next to the goals.
// TESSERA_SCALE_WARMUP_S (0: the idle window opens once membership converged, while daemons
// still connect to the members they probe for the first time) delays the idle window.
// TESSERA_SCALE_NODES (64), TESSERA_SCALE_SMALL_NODES (8), TESSERA_SCALE_IDLE_S (20) and
// TESSERA_SCALE_CONVERGE_S (60 + 3 per daemon) change the sizes and the convergence deadline.
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "proto/admin.grpc.pb.h"
#include "tests/harness.h"
#include "tests/metrics_page.h"

namespace tessera::testing {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr uint64_t kStoreBytes = uint64_t{64} << 20;
constexpr char kMessagesMetric[] = "tessera_membership_messages_sent_total";
constexpr int kJobSteps = 3;

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  int parsed = 0;
  return value != nullptr && absl::SimpleAtoi(value, &parsed) && parsed > 0 ? parsed : fallback;
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// CPU seconds (user + system) and threads of a process, from /proc/<pid>/stat.
struct ProcStat {
  double cpu_s = 0;
  int threads = 0;
};

std::optional<ProcStat> ReadProcStat(pid_t pid) {
  const std::string text = ReadFile(absl::StrCat("/proc/", pid, "/stat"));
  const size_t name_end = text.rfind(')');  // the command name may hold spaces
  if (name_end == std::string::npos) return std::nullopt;
  std::vector<std::string> fields =
      absl::StrSplit(text.substr(name_end + 1), ' ', absl::SkipEmpty());
  // fields[0] is field 3 of proc(5): utime is field 14, stime 15, num_threads 20.
  int64_t utime = 0, stime = 0, threads = 0;
  if (fields.size() < 18 || !absl::SimpleAtoi(fields[11], &utime) ||
      !absl::SimpleAtoi(fields[12], &stime) || !absl::SimpleAtoi(fields[17], &threads)) {
    return std::nullopt;
  }
  return ProcStat{static_cast<double>(utime + stime) / sysconf(_SC_CLK_TCK),
                  static_cast<int>(threads)};
}

int CountSockets(pid_t pid) {
  int sockets = 0;
  std::error_code ec;
  for (const auto& fd :
       std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/fd"), ec)) {
    std::error_code link_ec;
    const std::string target = std::filesystem::read_symlink(fd.path(), link_ec).string();
    sockets += absl::StartsWith(target, "socket:");
  }
  return sockets;
}

// The Unix time in ms of a daemon log line ("2025-01-31T12:34:56.789 I ..."; local time, as
// spdlog writes it); -1 if the line does not start with one.
int64_t LogLineUnixMs(const std::string& line) {
  std::tm tm{};
  int ms = 0;
  if (std::sscanf(line.c_str(), "%d-%d-%dT%d:%d:%d.%d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                  &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms) != 7) {
    return -1;
  }
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  tm.tm_isdst = -1;
  return static_cast<int64_t>(std::mktime(&tm)) * 1000 + ms;
}

// Lines of a daemon's log that hold `marker`.
std::vector<std::string> LogLinesWith(const std::string& log_path, const std::string& marker) {
  std::vector<std::string> lines;
  for (absl::string_view line : absl::StrSplit(ReadFile(log_path), '\n')) {
    if (absl::StrContains(line, marker)) lines.emplace_back(line);
  }
  return lines;
}

// When a daemon's log first says that it committed `step` (or a newer one) of `job`; -1 if not.
int64_t CommitUnixMs(const std::string& log_path, const std::string& job, int64_t step) {
  const std::string marker = "job '" + job + "' committed step ";
  for (const std::string& line : LogLinesWith(log_path, marker)) {
    const std::string rest = line.substr(line.find(marker) + marker.size());
    int64_t committed = -1;
    if (absl::SimpleAtoi(rest.substr(0, rest.find(' ')), &committed) && committed >= step) {
      return LogLineUnixMs(line);
    }
  }
  return -1;
}

// When (job, rank, step) was sealed and when protected, from the daemon's line "job 'J' rank R
// step S: protected (...) in T ms, ...; D ms after it was sealed"; nullopt while it has none.
struct SealAndProtection {
  int64_t sealed_unix_ms = -1;
  int64_t protected_unix_ms = -1;
};
std::optional<SealAndProtection> ProtectedInLog(const std::string& log_path, const std::string& job,
                                                int rank, int64_t step) {
  const std::string marker =
      absl::StrCat("job '", job, "' rank ", rank, " step ", step, ": protected (");
  const std::string after = " ms after it was sealed";
  for (const std::string& line : LogLinesWith(log_path, marker)) {
    const size_t end = line.rfind(after);
    const size_t begin = line.rfind("; ", end);
    int64_t delay_ms = 0;
    if (end == std::string::npos || begin == std::string::npos ||
        !absl::SimpleAtoi(line.substr(begin + 2, end - begin - 2), &delay_ms)) {
      continue;
    }
    const int64_t at = LogLineUnixMs(line);
    return SealAndProtection{at - delay_ms, at};
  }
  return std::nullopt;
}

// `n` daemons on loopback, each listing all as cluster.members, with a metrics endpoint.
class ScaleCluster {
 public:
  ScaleCluster(const std::string& root, int n) {
    std::vector<std::string> addresses;
    for (int i = 0; i < n; ++i) addresses.push_back(absl::StrCat("127.0.0.1:", FreePort()));
    for (int i = 0; i < n; ++i) {
      metrics_ports_.push_back(FreePort());
      daemons_.push_back(std::make_unique<DaemonProcess>(
          root, absl::StrCat("n", i), kStoreBytes,
          // clang-format off
          std::vector<std::string>{
              "--set", "peer.listen_address=" + addresses[i],
              "--set", "cluster.members=" + absl::StrJoin(addresses, ","),
              "--set", "cluster.token=scale-test-cluster-token",
              "--set", absl::StrCat("metrics.listen_address=127.0.0.1:", metrics_ports_[i])}));
      // clang-format on
    }
    stubs_.resize(n);
  }
  int size() const { return static_cast<int>(daemons_.size()); }
  DaemonProcess& operator[](int i) { return *daemons_[i]; }

  // Starts every daemon at once; each must answer on its socket within two minutes.
  bool Start(std::string* error) {
    std::vector<std::string> errors(size());
    std::vector<std::thread> starters;
    for (int i = 0; i < size(); ++i) {
      starters.emplace_back([this, i, &errors] {
        if (daemons_[i]->Start(&errors[i], seconds(120))) Connect(i);
      });
    }
    for (std::thread& t : starters) t.join();
    for (int i = 0; i < size(); ++i) {
      if (!errors[i].empty()) {
        *error = absl::StrCat("n", i, ": ", errors[i]);
        return false;
      }
    }
    return true;
  }

  // How many other members daemon i's own status lists as ALIVE.
  absl::StatusOr<int> AlivePeers(int i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + seconds(10));
    admin::GetStatusRequest request;
    request.set_local_only(true);
    admin::GetStatusResponse response;
    grpc::Status s = stubs_[i]->GetStatus(&context, request, &response);
    if (!s.ok()) return absl::UnavailableError(absl::StrCat("n", i, ": ", s.error_message()));
    return static_cast<int>(std::count_if(
        response.members().begin(), response.members().end(),
        [](const admin::MemberStatus& m) { return m.state() == admin::MemberStatus::ALIVE; }));
  }

  // Sweeps over `nodes` until one sweep finds each seeing every other member alive, or the
  // deadline passes (false, with the last sweep's laggards in *why).
  bool WaitConverged(const std::vector<int>& nodes, Clock::duration deadline, std::string* why) {
    const auto give_up = Clock::now() + deadline;
    while (true) {
      std::vector<std::string> behind;
      for (int i : nodes) {
        if (Clock::now() > give_up) {  // a sweep of daemons slow to answer ends at the deadline
          behind.push_back(absl::StrCat("n", i, " not asked"));
          continue;
        }
        absl::StatusOr<int> alive = AlivePeers(i);
        if (!alive.ok() || *alive != size() - 1) {
          behind.push_back(alive.ok() ? absl::StrCat("n", i, " sees ", *alive)
                                      : alive.status().ToString());
        }
      }
      if (behind.empty()) return true;
      if (Clock::now() > give_up) {
        *why = absl::StrCat(behind.size(), " of ", nodes.size(), " daemons do not see all ",
                            size() - 1, " others alive: ", absl::StrJoin(behind, "; "));
        return false;
      }
      std::this_thread::sleep_for(milliseconds(200));
    }
  }

  // SIGKILL and delete the store directory: the node is gone with its memory.
  void Lose(int i) {
    daemons_[i]->Kill(SIGKILL);
    std::filesystem::remove_all(daemons_[i]->store_dir());
  }

  // Daemon i started again (after Lose: a replacement with an empty store and a new incarnation).
  bool StartOne(int i, std::string* error) {
    if (!daemons_[i]->Start(error, seconds(120))) return false;
    Connect(i);
    return true;
  }

  int metrics_port(int i) const { return metrics_ports_[i]; }

 private:
  // A fresh admin channel to daemon i's agent socket.
  void Connect(int i) {
    stubs_[i] = admin::Admin::NewStub(grpc::CreateChannel("unix:" + daemons_[i]->socket_path(),
                                                          grpc::InsecureChannelCredentials()));
  }

  std::vector<int> metrics_ports_;
  std::vector<std::unique_ptr<DaemonProcess>> daemons_;
  std::vector<std::unique_ptr<admin::Admin::Stub>> stubs_;
};

std::vector<int> AllNodes(int n) {
  std::vector<int> nodes(n);
  for (int i = 0; i < n; ++i) nodes[i] = i;
  return nodes;
}

// What one cluster size measured; NaN: not measured (an earlier phase failed).
struct Figures {
  int nodes = 0;
  double start_s = NAN;     // every daemon started (all at once) and answering on its socket
  double converge_s = NAN;  // from then to the first sweep in which every view is complete
  double idle_window_s = NAN;
  double idle_cpu_s = NAN;    // all daemons together over the window
  double sockets_mean = NAN;  // per daemon, over the samples
  int sockets_max = 0;
  double threads_mean = NAN;
  int threads_max = 0;
  double messages_per_daemon_s = NAN;  // NaN with messages_exported false: n/a
  bool messages_exported = false;
  double seal_to_all_protected_s = NAN;  // c: from the last seal (daemons' logs)
  double seal_to_first_commit_s = NAN;
  double seal_to_all_committed_s = NAN;
  double rebuild_s = NAN;  // d: the replacement up and converged -> rank verified
  double replacement_converge_s = NAN;

  double idle_cpu_percent() const { return 100 * idle_cpu_s / idle_window_s; }
};

// The membership message counters of every daemon summed; nullopt when a daemon lacks one.
std::optional<double> MembershipMessages(ScaleCluster& cluster) {
  double total = 0;
  for (int i = 0; i < cluster.size(); ++i) {
    absl::StatusOr<std::map<std::string, double>> samples = ScrapeMetrics(cluster.metrics_port(i));
    EXPECT_TRUE(samples.ok()) << samples.status();
    const double messages = samples.ok() ? SumOfMetric(*samples, kMessagesMetric) : -1;
    if (messages < 0) return std::nullopt;
    total += messages;
  }
  return total;
}

// CPU seconds used so far by every daemon of the cluster together.
double CpuSeconds(ScaleCluster& cluster) {
  double total = 0;
  for (int i = 0; i < cluster.size(); ++i) {
    total += ReadProcStat(cluster[i].pid()).value_or(ProcStat{}).cpu_s;
  }
  return total;
}

// Phase b: the cluster left alone for `window_s` seconds.
void MeasureIdle(ScaleCluster& cluster, int window_s, Figures* figures) {
  const int n = cluster.size();
  const auto counted_from = Clock::now();
  const std::optional<double> messages_before = MembershipMessages(cluster);
  const double cpu_before = CpuSeconds(cluster);
  const auto start = Clock::now();
  int64_t sockets_sum = 0, threads_sum = 0, samples = 0;
  for (int second = 0; second < window_s; ++second) {
    std::this_thread::sleep_for(seconds(1));
    for (int i = 0; i < n; ++i) {
      const int sockets = CountSockets(cluster[i].pid());
      const int threads = ReadProcStat(cluster[i].pid()).value_or(ProcStat{}).threads;
      sockets_sum += sockets;
      threads_sum += threads;
      figures->sockets_max = std::max(figures->sockets_max, sockets);
      figures->threads_max = std::max(figures->threads_max, threads);
      ++samples;
    }
  }
  figures->idle_cpu_s = CpuSeconds(cluster) - cpu_before;
  figures->idle_window_s = SecondsSince(start);
  figures->sockets_mean = static_cast<double>(sockets_sum) / samples;
  figures->threads_mean = static_cast<double>(threads_sum) / samples;
  const std::optional<double> messages_after = MembershipMessages(cluster);
  figures->messages_exported = messages_before.has_value() && messages_after.has_value();
  if (figures->messages_exported) {
    figures->messages_per_daemon_s =
        (*messages_after - *messages_before) / n / SecondsSince(counted_from);
  }
  // A daemon that died while idle would make every figure above a lie.
  for (int i = 0; i < n; ++i) EXPECT_EQ(kill(cluster[i].pid(), 0), 0) << "n" << i << " exited";
}

// 256 KiB per rank.
std::vector<std::string> TrainerArgs(DaemonProcess& d, const std::string& job, uint64_t seed,
                                     int rank, int world) {
  return TrainerCommand(d, job, seed + rank, rank, world, TrainerLayout{4, 1000, 100000, 262144});
}

// Phase c: rank r on node r seals steps 1..kJobSteps; every daemon must commit the last.
void SealAndCommit(ScaleCluster& cluster, const std::string& job, uint64_t seed, Figures* figures) {
  const int n = cluster.size();
  std::vector<std::unique_ptr<Process>> trainers;
  for (int r = 0; r < n; ++r) {
    auto argv = TrainerArgs(cluster[r], job, seed, r, n);
    argv.insert(argv.end(),
                {absl::StrCat("--steps=", kJobSteps), "--step-sleep-ms=100", "--when-busy=wait"});
    trainers.push_back(Process::Start(argv));
  }
  for (int r = 0; r < n; ++r) {
    Process& t = *trainers[r];
    ASSERT_EQ(t.Wait(seconds(300)), 0) << "rank " << r << ":\n"
                                       << absl::StrJoin(t.lines(), "\n") << "\nn" << r << " log:\n"
                                       << cluster[r].LogTail();
    ASSERT_EQ(LastEvent(t.lines(), "sealed"), kJobSteps) << absl::StrJoin(t.lines(), "\n");
  }
  // Every daemon holds a rank, so every daemon must protect it and commit the step.
  std::vector<std::optional<SealAndProtection>> sealed(n);
  std::vector<int64_t> committed_ms(n, -1);
  const auto give_up = Clock::now() + seconds(300);
  for (bool all = false; !all;) {
    all = true;
    for (int i = 0; i < n; ++i) {
      if (!sealed[i]) sealed[i] = ProtectedInLog(cluster[i].log_path(), job, i, kJobSteps);
      if (committed_ms[i] < 0)
        committed_ms[i] = CommitUnixMs(cluster[i].log_path(), job, kJobSteps);
      all = all && sealed[i] && committed_ms[i] >= 0;
    }
    if (all) break;
    if (Clock::now() > give_up) {
      std::vector<std::string> missing;
      int first = -1;
      for (int i = 0; i < n; ++i) {
        if (sealed[i] && committed_ms[i] >= 0) continue;
        missing.push_back(absl::StrCat("n", i, sealed[i] ? "" : " (not protected)"));
        first = first < 0 ? i : first;
      }
      FAIL() << missing.size() << " of " << n << " daemons did not protect their rank's step "
             << kJobSteps << " and commit it within 300 s: " << absl::StrJoin(missing, ", ")
             << "\nn" << first << "'s log:\n"
             << cluster[first].LogTail();
    }
    std::this_thread::sleep_for(milliseconds(500));
  }
  int64_t last_seal_ms = -1, last_protected_ms = -1;
  for (const auto& s : sealed) {
    last_seal_ms = std::max(last_seal_ms, s->sealed_unix_ms);
    last_protected_ms = std::max(last_protected_ms, s->protected_unix_ms);
  }
  figures->seal_to_all_protected_s = (last_protected_ms - last_seal_ms) / 1000.0;
  figures->seal_to_first_commit_s =
      (*std::min_element(committed_ms.begin(), committed_ms.end()) - last_seal_ms) / 1000.0;
  figures->seal_to_all_committed_s =
      (*std::max_element(committed_ms.begin(), committed_ms.end()) - last_seal_ms) / 1000.0;
}

// Phase d: node `lost` is lost and replaced; its rank restores there, rebuilt from fragments.
void LoseAndRebuild(ScaleCluster& cluster, const std::string& job, uint64_t seed, int lost,
                    Figures* figures) {
  cluster.Lose(lost);
  std::printf("n%d lost (SIGKILL, store deleted); starting its replacement\n", lost);
  const auto replaced = Clock::now();
  std::string error;
  ASSERT_TRUE(cluster.StartOne(lost, &error)) << error;
  ASSERT_TRUE(cluster.WaitConverged({lost}, seconds(120), &error)) << error;
  figures->replacement_converge_s = SecondsSince(replaced);
  const auto rebuild_start = Clock::now();
  auto argv = TrainerArgs(cluster[lost], job, seed, lost, cluster.size());
  argv.push_back("--mode=verify");
  auto verifier = Process::Start(argv);
  ASSERT_EQ(verifier->Wait(seconds(300)), 0)
      << absl::StrJoin(verifier->lines(), "\n") << "\nreplacement's log:\n"
      << cluster[lost].LogTail();
  figures->rebuild_s = SecondsSince(rebuild_start);
  // The trainer checked every restored byte against its seeded state.
  EXPECT_GE(LastEvent(verifier->lines(), "verified"), kJobSteps)
      << absl::StrJoin(verifier->lines(), "\n");
  EXPECT_TRUE(
      absl::StrContains(ReadFile(cluster[lost].log_path()), "rebuilt from 3 of 5 fragments"))
      << cluster[lost].LogTail();
}

// Phases a to c (and d when `lose_a_node`) on a fresh cluster of `n`.
void RunCluster(int n, int idle_s, uint64_t seed, bool lose_a_node, Figures* figures) {
  figures->nodes = n;
  TempRoot root;
  ScaleCluster cluster(root.path(), n);
  std::string error;
  const auto start = Clock::now();
  ASSERT_TRUE(cluster.Start(&error)) << error;
  figures->start_s = SecondsSince(start);
  std::printf("%d daemons started (all at once) in %.1f s\n", n, figures->start_s);
  const auto started = Clock::now();
  const int converge_s = EnvInt("TESSERA_SCALE_CONVERGE_S", 60 + 3 * n);
  const bool converged = cluster.WaitConverged(AllNodes(n), seconds(converge_s), &error);
  // Not converged: the test fails, but what the daemons cost meanwhile is still measured.
  EXPECT_TRUE(converged) << "after " << SecondsSince(started) << " s: " << error;
  if (converged) {
    figures->converge_s = SecondsSince(started);
    std::printf("membership converged %.1f s later\n", figures->converge_s);
  }
  // Each daemon probes every member in turn, so for the first N periods it still opens
  // connections: TESSERA_SCALE_WARMUP_S (bench/scale_bench.sh: 70) measures the steady state.
  const int warmup_s = EnvInt("TESSERA_SCALE_WARMUP_S", 0);
  if (warmup_s > 0) {
    std::printf("warming up for %d s before the idle window\n", warmup_s);
    std::this_thread::sleep_for(seconds(warmup_s));
  }
  MeasureIdle(cluster, idle_s, figures);
  std::printf("%d daemons %s for %.1f s: %.2f CPU-s\n", n, converged ? "idle" : "not converged",
              figures->idle_window_s, figures->idle_cpu_s);
  if (!converged) return;
  const std::string job = absl::StrCat("scale-", n);
  SealAndCommit(cluster, job, seed, figures);
  if (!lose_a_node || ::testing::Test::HasFatalFailure()) return;
  std::mt19937_64 rng(seed);
  const int lost = 1 + static_cast<int>(rng() % (n - 1));
  LoseAndRebuild(cluster, job, seed, lost, figures);
}

std::string Format(double value, const char* format = "%.2f") {
  return std::isnan(value) ? "-" : absl::StrFormat(format, value);
}

// The figures as a table; with goals (bench mode), each goal and whether it was met.
void PrintTable(const Figures& small, const Figures& large, bool goals) {
  auto messages = [](const Figures& f) {
    return f.messages_exported ? Format(f.messages_per_daemon_s, "%.1f")
                               : std::string(std::isnan(f.idle_cpu_s) ? "-" : "n/a");
  };
  auto verdict = [](bool measured, bool met) {
    return !measured ? std::string("not measured") : met ? std::string("met") : "MISSED";
  };
  const double ratio = large.messages_per_daemon_s / small.messages_per_daemon_s;
  struct Row {
    std::string what, small, large, goal, verdict;
  };
  const std::vector<Row> rows = {
      {"a. start the daemons, all at once (s)", Format(small.start_s, "%.1f"),
       Format(large.start_s, "%.1f"), "", ""},
      {"a. then membership converged in (s)", Format(small.converge_s, "%.1f"),
       Format(large.converge_s, "%.1f"), "", ""},
      {"b. idle CPU, all daemons (% of a core)", Format(small.idle_cpu_percent(), "%.1f"),
       Format(large.idle_cpu_percent(), "%.1f"), absl::StrCat("< 10 (", large.nodes, " daemons)"),
       verdict(!std::isnan(large.idle_cpu_s), large.idle_cpu_percent() < 10)},
      {"b. idle CPU per daemon (% of a core)",
       Format(small.idle_cpu_percent() / small.nodes, "%.2f"),
       Format(large.idle_cpu_percent() / large.nodes, "%.2f"), "", ""},
      {"b. sockets per daemon (mean / max)",
       Format(small.sockets_mean, "%.0f") + " / " + std::to_string(small.sockets_max),
       Format(large.sockets_mean, "%.0f") + " / " + std::to_string(large.sockets_max), "", ""},
      {"b. threads per daemon (mean / max)",
       Format(small.threads_mean, "%.0f") + " / " + std::to_string(small.threads_max),
       Format(large.threads_mean, "%.0f") + " / " + std::to_string(large.threads_max), "", ""},
      {"b. membership msgs per daemon per s", messages(small), messages(large),
       absl::StrCat(large.nodes, " <= 1.1 x ", small.nodes, " (not growing)"),
       verdict(small.messages_exported && large.messages_exported, ratio <= 1.1)},
      {"c. last seal -> every rank protected (s)", Format(small.seal_to_all_protected_s),
       Format(large.seal_to_all_protected_s), "", ""},
      {"c. last seal -> first daemon committed (s)", Format(small.seal_to_first_commit_s),
       Format(large.seal_to_first_commit_s), "", ""},
      {"c. last seal -> every daemon committed (s)", Format(small.seal_to_all_committed_s),
       Format(large.seal_to_all_committed_s), absl::StrCat("<= 2 (", large.nodes, " daemons)"),
       verdict(!std::isnan(large.seal_to_all_committed_s), large.seal_to_all_committed_s <= 2)},
      {"d. replacement up and converged (s)", "", Format(large.replacement_converge_s, "%.1f"), "",
       ""},
      {"d. lost rank restored bit-exact (s)", "", Format(large.rebuild_s), "", ""},
  };
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);
  std::printf("\nscale: tesserad on loopback, %ld cores, load average %.1f at the end\n",
              sysconf(_SC_NPROCESSORS_ONLN), load[0]);
  const std::string header_small = absl::StrCat(small.nodes, " daemons");
  const std::string header_large = absl::StrCat(large.nodes, " daemons");
  if (goals) {
    std::printf("%-44s %12s %12s  %-30s %s\n", "phase", header_small.c_str(), header_large.c_str(),
                "goal", "verdict");
  } else {
    std::printf("%-44s %12s %12s\n", "phase", header_small.c_str(), header_large.c_str());
  }
  for (const Row& r : rows) {
    if (goals) {
      std::printf("%-44s %12s %12s  %-30s %s\n", r.what.c_str(), r.small.c_str(), r.large.c_str(),
                  r.goal.c_str(), r.verdict.c_str());
    } else {
      std::printf("%-44s %12s %12s\n", r.what.c_str(), r.small.c_str(), r.large.c_str());
    }
  }
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  for (const Figures* f : {&small, &large}) {
    if (f->idle_cpu_percent() >= 90.0 * cores) {
      std::printf(
          "(%d daemons: %.0f%% of a core is the whole machine's %ld cores: capped, the "
          "daemons wanted more)\n",
          f->nodes, f->idle_cpu_percent(), cores);
    }
    if (f->idle_window_s > 0 && std::isnan(f->converge_s)) {
      std::printf("(%d daemons: membership never converged: b measured them not converged)\n",
                  f->nodes);
    }
  }
  if (!small.messages_exported || !large.messages_exported) {
    std::printf("(n/a: the daemons export no %s)\n", kMessagesMetric);
  }
  std::fflush(stdout);
}

TEST(ScaleTest, DaemonsConvergeIdleCommitAJobAndRebuildALostRank) {
  const uint64_t seed = TestSeed();
  const int large_n = EnvInt("TESSERA_SCALE_NODES", 64);
  const int small_n = EnvInt("TESSERA_SCALE_SMALL_NODES", 8);
  const int idle_s = EnvInt("TESSERA_SCALE_IDLE_S", 20);
  ASSERT_GE(small_n, 6) << "RS(3, 2) needs 6 nodes for a rank and its 5 fragments";
  Figures small, large;
  small.nodes = small_n;
  large.nodes = large_n;
  absl::Cleanup table = [&] {
    PrintTable(small, large, std::getenv("TESSERA_SCALE_BENCH") != nullptr);
  };
  RunCluster(small_n, idle_s, seed, /*lose_a_node=*/false, &small);
  if (HasFatalFailure()) return;
  RunCluster(large_n, idle_s, seed, /*lose_a_node=*/true, &large);
}

}  // namespace
}  // namespace tessera::testing
