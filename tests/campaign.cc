#include "tests/campaign.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/segment.h"
#include "daemon/transfer/test_certificates.h"
#include "tests/campaign_journal.h"
#include "tests/campaign_net.h"
#include "tests/harness.h"

namespace tessera::testing {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr int kRanksPerNode = 2;
// Deadlines: only for hangs, never to judge speed. Generous, for a loaded 2-core machine.
constexpr auto kClusterDeadline = seconds(60);
constexpr auto kSuspectDeadline = seconds(30);

const char* const kFaultNames[kFaultKinds] = {
    "trainer-kill", "rank-restart", "daemon-kill", "node-loss", "flip-fragment",     "flip-slot",
    "daemon-stop",  "zombie",       "job-restart", "partition", "partition-restart", "link-cut"};

// A commit a daemon logged: commits are ordered by (epoch, step), so a late commit of an
// abandoned epoch is older than any of a newer one, whatever its step (docs/PROTOCOL.md).
struct LoggedCommit {
  uint64_t epoch = 0;
  int64_t step = -1;
  bool operator<(const LoggedCommit& o) const {
    return std::tie(epoch, step) < std::tie(o.epoch, o.step);
  }
};

// A daemon's log, read as it grows (the harness appends every incarnation of a node to one file).
class DaemonLog {
 public:
  DaemonLog(std::string name, std::string path, std::string job)
      : name_(std::move(name)),
        path_(std::move(path)),
        commit_re_("job '" + job + "' committed step ([0-9]+) \\(epoch ([0-9]+)"),
        superseded_re_("job '" + job + "': commit of step ([0-9]+) \\(epoch ([0-9]+)\\) "
                       "superseded") {}

  // Reads what was appended since the last call.
  void Poll() {
    std::ifstream in(path_, std::ios::binary);
    if (!in) return;
    in.seekg(static_cast<std::streamoff>(text_.size()));
    std::stringstream more;
    more << in.rdbuf();
    text_ += more.str();
    const size_t complete = text_.rfind('\n');
    if (complete == std::string::npos || complete < scanned_) return;
    for (auto it = std::sregex_iterator(text_.begin() + scanned_, text_.begin() + complete,
                                        commit_re_);
         it != std::sregex_iterator(); ++it) {
      const LoggedCommit c{std::stoull((*it)[2].str()), std::stoll((*it)[1].str())};
      commits_.insert(c);
    }
    for (auto it = std::sregex_iterator(text_.begin() + scanned_, text_.begin() + complete,
                                        superseded_re_);
         it != std::sregex_iterator(); ++it) {
      superseded_.insert(LoggedCommit{std::stoull((*it)[2].str()), std::stoll((*it)[1].str())});
    }
    for (size_t at = text_.find(kRerouted, scanned_); at < complete;
         at = text_.find(kRerouted, at + 1)) {
      ++reroutes_;
    }
    scanned_ = complete;
  }
  const std::string& name() const { return name_; }
  // Every commit logged so far, and those the daemon logged as superseded by a restore decided
  // without them (docs/PROTOCOL.md, Restore 3).
  const std::set<LoggedCommit>& commits() const { return commits_; }
  const std::set<LoggedCommit>& superseded() const { return superseded_; }
  // Fragments the daemon sent to a spare after a member could not be reached (its warning).
  int reroutes() const { return reroutes_; }
  size_t size() const { return text_.size(); }
  // Whether a line since offset `from` matches `re`.
  bool Seen(size_t from, const std::regex& re) const {
    return std::regex_search(text_.begin() + std::min(from, text_.size()), text_.end(), re);
  }
  // The last `count` lines that match one of `needles` (every line when empty).
  std::vector<std::string> Lines(const std::vector<std::string>& needles, size_t count) const {
    std::vector<std::string> out;
    for (absl::string_view line : absl::StrSplit(text_, '\n', absl::SkipEmpty())) {
      bool keep = needles.empty();
      for (const auto& n : needles) keep = keep || absl::StrContains(line, n);
      if (keep) out.emplace_back(line);
    }
    if (out.size() > count) out.erase(out.begin(), out.end() - static_cast<ptrdiff_t>(count));
    return out;
  }

 private:
  std::string name_, path_;
  std::regex commit_re_, superseded_re_;
  std::string text_;
  size_t scanned_ = 0;
  std::set<LoggedCommit> commits_, superseded_;
  static constexpr const char* kRerouted = "; sending the fragment to ";
  int reroutes_ = 0;
};

struct Shape {
  int nodes, k, m;
  uint64_t rank_bytes;
  int every, step_sleep_ms;
  bool wait_when_busy;
  std::set<int> grpc_only;  // nodes whose data path is gRPC streams
  bool tls = false;         // mutual TLS between the daemons
  std::set<int> openssl;    // under TLS, nodes that seal with OpenSSL (the others: "auto")

  int world() const { return nodes * kRanksPerNode; }
  std::string Describe() const {
    return absl::StrCat(
        nodes, " nodes RS(", k, ",", m, "), ", world(), " ranks of ", rank_bytes >> 10,
        " KiB, a snapshot every ", every, " steps (", wait_when_busy ? "wait" : "skip",
        " when busy), ", step_sleep_ms, " ms per step",
        grpc_only.empty() ? "" : absl::StrCat(", n", *grpc_only.begin(), " on gRPC streams"),
        tls ? absl::StrCat(", mutual TLS (", openssl.size(), " of ", nodes,
                           " nodes sealing with OpenSSL)")
            : "");
  }
};

// What a rank's launch did when it started.
struct StartOutcome {
  enum Kind { kResumed, kFresh, kError, kHang } kind = kHang;
  int64_t step = -1;
  std::string line;  // the deciding line (or the last lines on a hang)
};

// Data lost or damaged since the last commit of a step snapshotted after it, per rank: whether
// its owner's copy is gone, and which other nodes' fragments are.
struct Damage {
  std::set<int> owner_lost;
  std::map<int, std::set<int>> fragments_lost;

  // With `owner_copies_kept` false (the skip policy), any rank's owner copy of the committed step
  // may be gone: a rank may overwrite a protected step before its daemon learns that it was
  // committed (docs/PROTOCOL.md, States), and then only its fragments hold it.
  bool Survivable(int m, bool owner_copies_kept) const {
    for (const auto& [rank, lost] : fragments_lost) {
      if (static_cast<int>(lost.size()) > m && (!owner_copies_kept || owner_lost.count(rank))) {
        return false;
      }
    }
    return true;
  }
};

class Trial {
 public:
  Trial(uint64_t seed, const TrialOptions& options)
      : seed_(seed), options_(options), rng_(seed), job_(absl::StrCat("campaign-", seed % 100000)) {}

  ~Trial() { Teardown(); }

  TrialResult Run();

 private:
  struct Node {
    std::string id, host, address, root;
    std::unique_ptr<DaemonProcess> daemon;
    DaemonLog* log = nullptr;
    bool stopped = false, isolated = false;
  };
  struct Rank {
    std::unique_ptr<Process> trainer;
    uint64_t launch = 0;
    size_t parsed = 0;        // lines of `trainer` already read into the journal
    bool training = false;    // its start was checked; errors now count as trainer failures
    int64_t last_snapshot = -1;
    int relaunches = 0;
  };

  // --- setup and teardown
  bool Setup();
  std::vector<std::string> DaemonFlags(int node) const;
  std::unique_ptr<DaemonProcess> MakeDaemon(int node);
  bool StartDaemon(int node);
  void Teardown();

  // --- trainers
  void StartTrainer(int rank, bool verify);
  void KillTrainer(int rank);
  StartOutcome WaitStart(int rank, Clock::time_point deadline);
  // Checks a start against the journal and `floor` (the newest committed step before it):
  // the step it resumed, 0 when fresh, -2 when it failed.
  int64_t CheckStart(int rank, int64_t floor, Clock::time_point deadline,
                     const std::string& context);
  // Restarts every rank of `ranks` (killed already) and checks their starts; with `whole_job`,
  // that they all restored the same step.
  void RestartRanks(const std::vector<int>& ranks, bool whole_job, bool verify,
                    const std::string& context);
  // The two halves of RestartRanks: StartRanks returns the newest committed step before them.
  int64_t StartRanks(const std::vector<int>& ranks, bool verify);
  void CheckRanks(const std::vector<int>& ranks, int64_t floor, bool whole_job, bool verify,
                  const std::string& context);
  std::vector<int> AllRanks() const;
  void Pump();

  // --- faults
  void Inject(FaultKind kind);
  void FaultTrainerKill();
  void FaultRankRestart();
  void FaultDaemonKill();
  void FaultNodeLoss();
  void FaultFlip(bool fragment);
  void FaultDaemonStop();
  void FaultZombie();
  void FaultJobRestart();
  void FaultPartition();
  void FaultPartitionRestart();
  void FaultLinkCut();
  // Loses `nodes`: their trainers and daemons SIGKILLed, their memory deleted.
  void LoseNodes(const std::vector<int>& nodes);
  // How many nodes may be lost now with the data still rebuildable, and which ones.
  std::vector<int> LosableNodes(int at_most);
  FaultKind Draw();
  bool Allowed(FaultKind kind) const;

  // --- waiting and checking
  // The step of the newest commit (by epoch, then step) over every daemon log, leaving out the
  // commits some daemon logged as superseded (a cut-off coordinator's, which the majority never
  // learned and resumed without: after a partition-restart, the next restart's floor is the
  // majority's point, not that commit; seed 17300003 with the job restarted again before a newer
  // commit, on a loaded machine); who logged it goes to committed_by_.
  int64_t Committed();
  // The floor of a partition-restart once the cut-off node's commits that the majority never
  // learned are set aside: a commit of `cut_off` that some daemon logged as superseded by the
  // restore point the majority resumed from (docs/PROTOCOL.md, Restore 3). Other commits count.
  int64_t FloorWithoutSuperseded(const std::string& cut_off);
  void WaitFor(Clock::duration timeout, const std::string& what, const std::function<bool()>& done);
  bool WaitForProgress(const std::string& after);
  // Waits until a peer's log says, past `from` (each node's log size before the fault), that it
  // suspects `node`.
  bool WaitForSuspicion(int node, const std::vector<size_t>& from);
  std::vector<size_t> LogSizes() const;
  void CheckDaemons();
  void Sleep(milliseconds d);
  void Fail(const std::string& check, const std::string& detail);
  std::string LogExcerpt(const std::vector<std::string>& needles) const;
  // Each daemon's threads by scheduler state, and where the sleeping ones wait (/proc): after a
  // hang, whether a daemon was stopped, running, or blocked, and on what.
  std::string ProcessStates() const;
  // SIGSTOPs node's daemon and waits until the kernel shows it stopped (at most 2 s; the trace
  // says when it took longer or never happened).
  void Stop(int node);
  void Say(const std::string& line);
  void Trace(const std::string& line) { Say(line); }
  void KeepLogs();
  int NodeOf(int rank) const { return rank % shape_.nodes; }
  std::string BarrierDir() const { return root_.path() + "/barrier"; }
  int64_t MaxSnapshotStep() const;

  const uint64_t seed_;
  const TrialOptions options_;
  std::mt19937_64 rng_;
  const std::string job_;
  Shape shape_{};
  TempRoot root_;
  std::unique_ptr<NetLab> net_;
  std::unique_ptr<TestCa> ca_;                 // under TLS: the cluster's CA
  std::vector<ClusterTlsFiles> certificates_;  // under TLS: each node's
  std::vector<Node> nodes_;
  std::vector<std::unique_ptr<DaemonProcess>> zombies_;
  std::vector<std::unique_ptr<DaemonLog>> logs_;
  std::vector<Rank> ranks_;
  Journal journal_;
  Damage damage_;
  uint64_t launches_ = 0;
  int generation_ = 0;
  bool halted_ = false;  // a hang or stall: no more faults
  std::string committed_by_;
  // While a partition-restart runs: the node cut off, and every commit each node had logged
  // when the job was restarted (name -> commits).
  std::string cut_off_;
  std::map<std::string, std::set<LoggedCommit>> commits_at_restart_;
  std::vector<std::pair<std::string, int64_t>> behind_;  // (who, restored step) behind the floor
  Clock::time_point start_ = Clock::now();
  TrialResult result_;
};

// ------------------------------------------------------------------------------------------------
// Setup

bool Trial::Setup() {
  std::uniform_int_distribution<int> coin(0, 1);
  shape_.nodes = 4 + coin(rng_);
  shape_.k = 2;
  shape_.m = shape_.nodes == 5 && coin(rng_) ? 2 : 1;
  shape_.rank_bytes = (uint64_t{1} << 20) + rng_() % (uint64_t{1} << 20);
  shape_.every = 1 + coin(rng_);
  shape_.step_sleep_ms = 50 + static_cast<int>(rng_() % 51);
  shape_.wait_when_busy = !options_.skip_when_busy && rng_() % 4 != 0;
  if (rng_() % 3 == 0) shape_.grpc_only.insert(static_cast<int>(rng_() % shape_.nodes));
  std::mt19937_64 tls_draws(seed_ ^ 0x7153c0ffee5eedULL);  // not rng_: see TrialOptions::tls
  shape_.tls = options_.tls == "on" || (options_.tls == "drawn" && tls_draws() % 2 == 0);
  for (int i = 0; shape_.tls && i < shape_.nodes; ++i) {
    if (tls_draws() % 2 == 0) shape_.openssl.insert(i);
  }
  result_.shape = shape_.Describe();

  std::string network = "loopback";
  if (options_.no_partitions.empty()) {
    net_ = std::make_unique<NetLab>();
    std::string error;
    if (!net_->Setup(shape_.nodes, root_.path(), &error)) {
      Fail("daemon", "network namespaces failed although the probe passed: " + error);
      return false;
    }
    network = "network namespaces (partitions possible)";
  }
  Say(absl::StrCat("trial seed ", seed_, ": ", result_.shape, "; ", network, "; job '", job_,
                   "' in ", root_.path()));
  for (int i = 0; i < shape_.nodes; ++i) {
    Node n;
    n.id = absl::StrCat("n", i);
    n.host = net_ ? net_->Ip(i) : "127.0.0.1";
    n.address = absl::StrCat(n.host, ":", FreePort());
    n.root = root_.path();
    nodes_.push_back(std::move(n));
  }
  if (shape_.tls) {
    const std::string dir = root_.path() + "/certs";
    std::filesystem::create_directories(dir);
    absl::StatusOr<std::unique_ptr<TestCa>> ca = TestCa::Create(dir, "campaign-ca");
    if (!ca.ok()) {
      Fail("daemon", "cannot make the cluster's CA: " + ca.status().ToString());
      return false;
    }
    ca_ = std::move(*ca);
    for (int i = 0; i < shape_.nodes; ++i) {
      absl::StatusOr<ClusterTlsFiles> files = ca_->IssueNode(nodes_[i].id);
      if (!files.ok()) {
        Fail("daemon",
             "cannot issue " + nodes_[i].id + "'s certificate: " + files.status().ToString());
        return false;
      }
      certificates_.push_back(*files);
    }
  }
  for (int i = 0; i < shape_.nodes; ++i) {
    nodes_[i].daemon = MakeDaemon(i);
    logs_.push_back(std::make_unique<DaemonLog>(nodes_[i].id, nodes_[i].daemon->log_path(), job_));
    nodes_[i].log = logs_.back().get();
    if (!StartDaemon(i)) return false;
  }
  const std::regex joined(" member (n[0-9]+) at [^ ]+ joined");
  WaitFor(kClusterDeadline, "every daemon to hear every other", [&] {
    for (auto& n : nodes_) {
      n.log->Poll();
      std::set<std::string> heard;
      const std::string text = absl::StrJoin(n.log->Lines({" joined "}, 1000), "\n");
      for (auto it = std::sregex_iterator(text.begin(), text.end(), joined);
           it != std::sregex_iterator(); ++it) {
        heard.insert((*it)[1].str());
      }
      if (static_cast<int>(heard.size()) < shape_.nodes - 1) return false;
    }
    return true;
  });
  if (halted_) return false;
  for (auto& n : nodes_) {  // the daemons run what the shape says
    const bool tls = !n.log->Lines({"peer port: mutual TLS"}, 1).empty();
    if (tls != shape_.tls) {
      Fail("daemon", absl::StrCat(n.id, (tls ? " runs" : " does not run"), " mutual TLS"));
      return false;
    }
  }
  ranks_.resize(shape_.world());
  std::filesystem::create_directories(BarrierDir());
  Trace("cluster up; starting the job");
  RestartRanks(AllRanks(), /*whole_job=*/true, /*verify=*/false, "job start");
  return true;
}

std::vector<std::string> Trial::DaemonFlags(int node) const {
  std::vector<std::string> members;
  for (const auto& n : nodes_) members.push_back(n.address);
  // clang-format off
  std::vector<std::string> flags = {
      "--set", "peer.listen_address=" + nodes_[node].address,
      "--set", "cluster.members=" + absl::StrJoin(members, ","),
      "--set", absl::StrCat("ec.k=", shape_.k),
      "--set", absl::StrCat("ec.m=", shape_.m),
      "--set", "liveness.heartbeat_ms=100",
      "--set", "liveness.timeout_ms=1000",
      "--set", absl::StrCat("cluster.token=campaign-token-", absl::Hex(seed_, absl::kZeroPad16)),
      // Nodes on the gRPC data path send membership over gRPC too (every daemon answers
      // both transports).
      "--set", shape_.grpc_only.count(node) ? "liveness.transport=grpc" : "liveness.transport=udp",
      "--set", shape_.grpc_only.count(node) ? "peer.data_path=grpc" : "peer.data_path=tcp"};
  // clang-format on
  if (shape_.tls) {
    const ClusterTlsFiles& files = certificates_[node];
    for (const std::string& flag :
         {"cluster.tls_cert_file=" + files.cert_file, "cluster.tls_key_file=" + files.key_file,
          "cluster.tls_ca_file=" + files.ca_file,
          std::string("cluster.tls_cipher_library=") +
              (shape_.openssl.count(node) ? "openssl" : "auto")}) {
      flags.push_back("--set");
      flags.push_back(flag);
    }
  }
  return flags;
}

std::unique_ptr<DaemonProcess> Trial::MakeDaemon(int node) {
  auto d = std::make_unique<DaemonProcess>(nodes_[node].root, nodes_[node].id, uint64_t{768} << 20,
                                           DaemonFlags(node));
  if (net_) d->SetLauncher(net_->Launcher(node));
  return d;
}

bool Trial::StartDaemon(int node) {
  std::string error;
  if (nodes_[node].daemon->Start(&error)) return true;
  Fail("daemon", absl::StrCat(nodes_[node].id, " did not start: ", error));
  halted_ = true;
  return false;
}

void Trial::Teardown() {
  for (auto& n : nodes_) {
    if (n.daemon && n.stopped) n.daemon->Signal(SIGCONT);
  }
  for (auto& r : ranks_) r.trainer.reset();
  for (auto& n : nodes_) n.daemon.reset();
  zombies_.clear();
  net_.reset();
}

// ------------------------------------------------------------------------------------------------
// Trainers

void Trial::StartTrainer(int rank, bool verify) {
  Rank& r = ranks_[rank];
  r.launch = ++launches_;
  r.parsed = 0;
  r.training = false;
  const uint64_t bytes = shape_.rank_bytes;
  std::vector<std::string> argv = {
      BinaryPath("tests/trainer"),
      "--socket=" + nodes_[NodeOf(rank)].daemon->socket_path(),
      "--job=" + job_,
      absl::StrCat("--seed=", seed_ * 1000 + static_cast<uint64_t>(rank)),
      absl::StrCat("--rank=", rank),
      absl::StrCat("--world=", shape_.world()),
      "--tensors=8",
      absl::StrCat("--min-bytes=", bytes / 24),
      absl::StrCat("--max-bytes=", bytes / 4),
      absl::StrCat("--total-bytes=", bytes),
      absl::StrCat("--every=", shape_.every),
      absl::StrCat("--step-sleep-ms=", shape_.step_sleep_ms),
      shape_.wait_when_busy ? "--when-busy=wait" : "--when-busy=skip",
      absl::StrCat("--launch=", r.launch),
      "--barrier=" + BarrierDir(),
      "--restore-retry-ms=120000",
      verify ? "--mode=verify" : "--mode=train"};
  r.trainer = Process::Start(argv, absl::StrCat(root_.path(), "/rank", rank, ".L", r.launch, ".err"));
}

void Trial::KillTrainer(int rank) {
  Rank& r = ranks_[rank];
  if (!r.trainer) return;
  r.training = false;
  r.trainer->Signal(SIGKILL);
  r.trainer->Wait(seconds(30));
  Pump();  // the journal takes the last digests it printed
  r.trainer.reset();
  // The other ranks wait for this one at their next step, as a synchronous job's ranks do.
  std::remove(absl::StrCat(BarrierDir(), "/rank", rank).c_str());
}

void Trial::Pump() {
  for (size_t i = 0; i < ranks_.size(); ++i) {
    Rank& r = ranks_[i];
    if (!r.trainer) continue;
    r.trainer->ReadUntil([](const std::string&) { return false; }, milliseconds(1));
    const auto& lines = r.trainer->lines();
    for (; r.parsed < lines.size(); ++r.parsed) {
      const std::string& line = lines[r.parsed];
      std::vector<std::string> words = absl::StrSplit(line, ' ');
      int64_t step = 0;
      uint64_t digest = 0;
      if (words.size() == 3 && words[0] == "digest" && absl::SimpleAtoi(words[1], &step) &&
          absl::SimpleHexAtoi(words[2], &digest)) {
        journal_.Snapshotted(static_cast<int>(i), r.launch, step, digest);
      } else if (words.size() == 2 && words[0] == "snapshot" && absl::SimpleAtoi(words[1], &step)) {
        r.last_snapshot = std::max(r.last_snapshot, step);
      } else if (r.training && absl::StartsWith(line, "error")) {
        Fail("trainer", absl::StrCat("rank ", i, " (launch L", r.launch, ") while training: ",
                                     line, LogExcerpt({" E ", " W "})));
      }
    }
    if (r.training && r.trainer->Wait(milliseconds(0)) >= 0) {
      Fail("trainer", absl::StrCat("rank ", i, " (launch L", r.launch, ") exited while training: ",
                                   absl::StrJoin(r.trainer->lines().end() -
                                                     std::min<size_t>(5, r.trainer->lines().size()),
                                                 r.trainer->lines().end(), " | ")));
      r.training = false;
    }
  }
}

StartOutcome Trial::WaitStart(int rank, Clock::time_point deadline) {
  Rank& r = ranks_[rank];
  StartOutcome out;
  std::optional<std::string> line;
  while (!line && Clock::now() < deadline) {
    line = r.trainer->ReadUntil(
        [](const std::string& l) {
          return absl::StartsWith(l, "resumed ") || l == "fresh" || absl::StartsWith(l, "error");
        },
        milliseconds(100));
    Pump();  // the other trainers' pipes must not fill meanwhile
    if (!line && r.trainer->Wait(milliseconds(0)) >= 0) break;  // exited without a word
  }
  if (!line) {
    const auto& lines = r.trainer->lines();
    out.line = absl::StrJoin(lines.end() - std::min<size_t>(6, lines.size()), lines.end(), " | ");
    return out;
  }
  out.line = *line;
  if (absl::StartsWith(*line, "resumed ")) {
    out.kind = StartOutcome::kResumed;
    out.step = LastEvent(r.trainer->lines(), "resumed");
  } else if (*line == "fresh") {
    out.kind = StartOutcome::kFresh;
  } else {
    out.kind = StartOutcome::kError;
  }
  return out;
}

int64_t Trial::CheckStart(int rank, int64_t floor, Clock::time_point deadline,
                          const std::string& context) {
  Rank& r = ranks_[rank];
  const StartOutcome out = WaitStart(rank, deadline);
  const std::string who = absl::StrCat("rank ", rank, " (launch L", r.launch, " on ",
                                       nodes_[NodeOf(rank)].id, ", ", context, ")");
  // The restored bytes, as printed before the trainer checked them.
  int64_t restored_step = -1;
  uint64_t restored_digest = 0;
  for (const auto& line : r.trainer->lines()) {
    std::vector<std::string> words = absl::StrSplit(line, ' ');
    if (words.size() == 3 && words[0] == "restored") {
      absl::SimpleAtoi(words[1], &restored_step);
      absl::SimpleHexAtoi(words[2], &restored_digest);
    }
  }
  if (restored_step >= 0) {
    const std::string wrong = journal_.CheckRestored(rank, restored_step, restored_digest);
    if (!wrong.empty()) {
      Fail("history", absl::StrCat(who, ": ", wrong,
                                   LogExcerpt({absl::StrCat("rank ", rank, " "), " E ", " W "})));
    }
    if (restored_step < floor && !cut_off_.empty()) {
      // Judged once every rank has restored (the cut-off node logs a superseded commit when it
      // learns the majority's decision, before its own ranks are answered).
      behind_.push_back({who, restored_step});
    } else if (restored_step < floor) {
      Fail("committed", absl::StrCat(who, " restored step ", restored_step, ", behind step ", floor,
                                     " which ", committed_by_, " had committed before it started",
                                     LogExcerpt({"committed step", " E ", " W "})));
    }
  }
  switch (out.kind) {
    case StartOutcome::kHang:
      Fail("hang",
           absl::StrCat(who, " did not finish its restore within ", options_.restore_deadline_s,
                        " s (or exited without a word); its last lines: ", out.line, LogExcerpt({}),
                        ProcessStates()));
      halted_ = true;
      return -2;
    case StartOutcome::kError:
      Fail("restore", absl::StrCat(who, ": ", out.line,
                                   LogExcerpt({absl::StrCat("rank ", rank, " "), " E ", " W "})));
      return -2;
    case StartOutcome::kFresh:
      if (floor >= 0) {
        Fail("committed", absl::StrCat(who, " started fresh although step ", floor, " was committed (",
                                       committed_by_, ")", LogExcerpt({" E ", " W "})));
      }
      journal_.Fresh(rank, r.launch);
      r.training = true;
      return 0;
    case StartOutcome::kResumed:
      journal_.Resumed(rank, r.launch, restored_step, restored_digest);
      r.training = true;
      return out.step;
  }
  return -2;
}

void Trial::RestartRanks(const std::vector<int>& ranks, bool whole_job, bool verify,
                         const std::string& context) {
  CheckRanks(ranks, StartRanks(ranks, verify), whole_job, verify, context);
}

std::vector<int> Trial::AllRanks() const {
  std::vector<int> all(ranks_.size());
  for (size_t r = 0; r < all.size(); ++r) all[r] = static_cast<int>(r);
  return all;
}

int64_t Trial::StartRanks(const std::vector<int>& ranks, bool verify) {
  const int64_t floor = Committed();
  for (int r : ranks) StartTrainer(r, verify);
  return floor;
}

void Trial::CheckRanks(const std::vector<int>& ranks, int64_t floor, bool whole_job, bool verify,
                       const std::string& context) {
  const auto deadline = Clock::now() + seconds(options_.restore_deadline_s);
  std::map<int64_t, std::vector<int>> steps;
  for (int r : ranks) {
    const int64_t step = CheckStart(r, floor, deadline, context);
    if (step >= -1) steps[step].push_back(r);
    if (verify) ranks_[r].training = false;
    if (halted_) return;
  }
  std::vector<std::string> summary;
  for (const auto& [step, who] : steps) {
    summary.push_back(absl::StrCat(step == 0 ? "fresh" : absl::StrCat("step ", step), ": ",
                                   who.size() == ranks.size() ? "all" : absl::StrJoin(who, ",")));
  }
  Trace(absl::StrCat(context, ": ", ranks.size(), " rank(s) restarted (committed before: ", floor,
                     "); ", absl::StrJoin(summary, "; ")));
  if (whole_job && steps.size() > 1) {
    Fail("same-step", absl::StrCat(context, ": the ranks of the job restored different steps: ",
                                   absl::StrJoin(summary, "; "),
                                   LogExcerpt({"restorable", "cannot be restored", " E ", " W "})));
  }
}

// ------------------------------------------------------------------------------------------------
// Faults

bool Trial::Allowed(FaultKind kind) const {
  if (std::find(options_.excluded.begin(), options_.excluded.end(), kind) !=
      options_.excluded.end()) {
    return false;
  }
  if (kind == FaultKind::kPartition || kind == FaultKind::kPartitionRestart ||
      kind == FaultKind::kLinkCut) {
    return net_ != nullptr;
  }
  return true;
}

FaultKind Trial::Draw() {
  while (true) {
    const auto kind = static_cast<FaultKind>(rng_() % kFaultKinds);
    if (Allowed(kind)) return kind;
  }
}

void Trial::Inject(FaultKind kind) {
  ++result_.fault_counts[kind];
  switch (kind) {
    case FaultKind::kTrainerKill: return FaultTrainerKill();
    case FaultKind::kRankRestart: return FaultRankRestart();
    case FaultKind::kDaemonKill: return FaultDaemonKill();
    case FaultKind::kNodeLoss: return FaultNodeLoss();
    case FaultKind::kFlipFragment: return FaultFlip(/*fragment=*/true);
    case FaultKind::kFlipSlot: return FaultFlip(/*fragment=*/false);
    case FaultKind::kDaemonStop: return FaultDaemonStop();
    case FaultKind::kZombie: return FaultZombie();
    case FaultKind::kJobRestart: return FaultJobRestart();
    case FaultKind::kPartition: return FaultPartition();
    case FaultKind::kPartitionRestart: return FaultPartitionRestart();
    case FaultKind::kLinkCut: return FaultLinkCut();
  }
}

void Trial::FaultTrainerKill() {
  const int rank = static_cast<int>(rng_() % ranks_.size());
  result_.faults.push_back(absl::StrCat("trainer-kill rank ", rank));
  Trace(absl::StrCat("fault: SIGKILL the trainer of rank ", rank, " (L", ranks_[rank].launch,
                     "), restart it"));
  KillTrainer(rank);
  RestartRanks({rank}, false, false, "trainer-kill");
}

void Trial::FaultRankRestart() {
  const int rank = static_cast<int>(rng_() % ranks_.size());
  const int down_ms = 500 + static_cast<int>(rng_() % 2500);
  result_.faults.push_back(absl::StrCat("rank-restart rank ", rank, " after ", down_ms, " ms"));
  Trace(absl::StrCat("fault: SIGKILL rank ", rank, " (L", ranks_[rank].launch, "), restart it ",
                     down_ms, " ms later; the other ranks keep running (and wait for it)"));
  KillTrainer(rank);
  Sleep(milliseconds(down_ms));
  RestartRanks({rank}, false, false, "rank-restart");
}

void Trial::FaultDaemonKill() {
  const int node = static_cast<int>(rng_() % nodes_.size());
  const int pause_ms = static_cast<int>(rng_() % 1500);
  result_.faults.push_back(absl::StrCat("daemon-kill ", nodes_[node].id));
  Trace(absl::StrCat("fault: SIGKILL tesserad ", nodes_[node].id, ", restart it on its memory after ",
                     pause_ms, " ms; its trainers train on"));
  nodes_[node].daemon->Kill(SIGKILL);
  nodes_[node].stopped = false;
  Sleep(milliseconds(pause_ms));
  StartDaemon(node);
}

std::vector<int> Trial::LosableNodes(int at_most) {
  std::vector<int> order(nodes_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  std::shuffle(order.begin(), order.end(), rng_);
  std::vector<int> chosen;
  Damage trial_damage = damage_;
  for (int node : order) {
    if (static_cast<int>(chosen.size()) >= at_most) break;
    Damage next = trial_damage;
    for (int r = 0; r < shape_.world(); ++r) {
      if (NodeOf(r) == node) {
        next.owner_lost.insert(r);
      } else {
        next.fragments_lost[r].insert(node);
      }
    }
    if (!next.Survivable(shape_.m, shape_.wait_when_busy)) continue;
    trial_damage = next;
    chosen.push_back(node);
  }
  return chosen;
}

void Trial::LoseNodes(const std::vector<int>& nodes) {
  for (int node : nodes) {
    for (int r = 0; r < shape_.world(); ++r) {
      if (NodeOf(r) == node) {
        KillTrainer(r);
        damage_.owner_lost.insert(r);
      } else {
        damage_.fragments_lost[r].insert(node);
      }
    }
    nodes_[node].daemon->Kill(SIGKILL);
    nodes_[node].stopped = false;
    std::error_code ec;
    std::filesystem::remove_all(nodes_[node].daemon->store_dir(), ec);
    if (ec) Fail("daemon", "deleting " + nodes_[node].daemon->store_dir() + ": " + ec.message());
  }
}

void Trial::FaultNodeLoss() {
  const int want = 1 + static_cast<int>(rng_() % shape_.m);
  const std::vector<int> lost = LosableNodes(want);
  const bool wait_for_suspicion = rng_() % 2 == 0;
  if (lost.empty()) {
    result_.faults.push_back("node-loss (none allowed: the data lost since the last commit)");
    Trace("fault: node-loss skipped: no node may be lost before a newer commit");
    return;
  }
  std::vector<std::string> names;
  for (int n : lost) names.push_back(nodes_[n].id);
  result_.faults.push_back(absl::StrCat("node-loss ", absl::StrJoin(names, ","),
                                        wait_for_suspicion ? " (suspected first)" : ""));
  Trace(absl::StrCat("fault: lose ", absl::StrJoin(names, " and "),
                     " (daemons and trainers SIGKILLed, memory deleted); replacements start",
                     wait_for_suspicion ? " once the peers suspect them" : " at once"));
  const std::vector<size_t> marks = LogSizes();
  LoseNodes(lost);
  if (wait_for_suspicion) {
    for (int n : lost) {
      if (!WaitForSuspicion(n, marks)) return;
    }
  }
  std::vector<int> ranks;
  for (int n : lost) {
    nodes_[n].daemon = MakeDaemon(n);
    if (!StartDaemon(n)) return;
    for (int r = 0; r < shape_.world(); ++r) {
      if (NodeOf(r) == n) ranks.push_back(r);
    }
  }
  RestartRanks(ranks, false, false, "node-loss");
}

std::vector<size_t> Trial::LogSizes() const {
  std::vector<size_t> sizes;
  for (const auto& n : nodes_) {
    n.log->Poll();
    sizes.push_back(n.log->size());
  }
  return sizes;
}

bool Trial::WaitForSuspicion(int node, const std::vector<size_t>& from) {
  const std::string member = " member " + nodes_[node].id + " at " + nodes_[node].address + " ";
  const std::regex suspected(member + "suspected");
  WaitFor(kSuspectDeadline, absl::StrCat("a peer to suspect ", nodes_[node].id), [&] {
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (static_cast<int>(i) == node) continue;
      nodes_[i].log->Poll();
      if (nodes_[i].log->Seen(from[i], suspected)) return true;
      // Still dead from an earlier fault: stopped again before it could refute (seed 5000831:
      // SIGCONTed after a daemon-stop, then SIGSTOPped for a zombie 0.2 s later), it is never
      // suspected anew.
      const std::vector<std::string> last = nodes_[i].log->Lines({member}, 1);
      if (!last.empty() && absl::StrContains(last.back(), member + "is dead")) return true;
    }
    return false;
  });
  return !halted_;
}

void Trial::FaultFlip(bool fragment) {
  const int64_t committed = Committed();
  struct Candidate {
    std::string path;
    int holder, rank;
    int64_t step;
    uint64_t payload;
  };
  std::vector<Candidate> candidates;
  for (size_t i = 0; i < nodes_.size(); ++i) {
    std::error_code ec;
    for (const auto& entry :
         std::filesystem::directory_iterator(nodes_[i].daemon->store_dir(), ec)) {
      const std::string path = entry.path().string();
      if (!absl::EndsWith(path, fragment ? ".frag" : ".slot")) continue;
      std::ifstream f(path, std::ios::binary);
      SegmentHeader h{};
      f.read(reinterpret_cast<char*>(&h), sizeof(h));
      if (!f || std::string(h.job_id) != job_ || LoadState(h) != SegmentState::kSealed ||
          h.payload_bytes == 0) {
        continue;
      }
      // A slot is only repairable once its step is protected: the committed one.
      if (fragment ? h.step < committed : h.step != committed) continue;
      candidates.push_back({path, static_cast<int>(i), static_cast<int>(h.rank), h.step,
                            h.payload_bytes});
    }
  }
  std::shuffle(candidates.begin(), candidates.end(), rng_);
  const char* name = fragment ? "flip-fragment" : "flip-slot";
  for (const Candidate& c : candidates) {
    Damage next = damage_;
    if (fragment) {
      next.fragments_lost[c.rank].insert(c.holder);
    } else {
      next.owner_lost.insert(c.rank);
    }
    if (!next.Survivable(shape_.m, shape_.wait_when_busy)) continue;
    const uint64_t offset = kSegmentHeaderBytes + rng_() % c.payload;
    const uint8_t mask = static_cast<uint8_t>(1 + rng_() % 255);
    std::fstream f(c.path, std::ios::in | std::ios::out | std::ios::binary);
    char byte = 0;
    f.seekg(static_cast<std::streamoff>(offset));
    f.read(&byte, 1);
    byte = static_cast<char>(byte ^ mask);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(&byte, 1);
    if (!f.good()) continue;
    damage_ = next;
    result_.faults.push_back(absl::StrCat(name, " rank ", c.rank, " step ", c.step, " on ",
                                          nodes_[c.holder].id));
    Trace(absl::StrCat("fault: flipped byte ", offset, " (xor ", int{mask}, ") of ",
                       fragment ? "a fragment" : "the slot", " of rank ", c.rank, " step ", c.step,
                       " on ", nodes_[c.holder].id, " (committed: ", committed, "): ", c.path));
    return;
  }
  result_.faults.push_back(absl::StrCat(name, " (nothing to flip within the budget)"));
  Trace(absl::StrCat("fault: ", name, " skipped: no sealed ", fragment ? "fragment" : "slot",
                     " of a step >= ", committed, " may be damaged now"));
}

void Trial::FaultDaemonStop() {
  const int node = static_cast<int>(rng_() % nodes_.size());
  const int ms = 300 + static_cast<int>(rng_() % 2700);
  result_.faults.push_back(absl::StrCat("daemon-stop ", nodes_[node].id, " ", ms, " ms"));
  Trace(absl::StrCat("fault: SIGSTOP tesserad ", nodes_[node].id, " for ", ms, " ms"));
  Stop(node);
  nodes_[node].stopped = true;
  Sleep(milliseconds(ms));
  nodes_[node].daemon->Signal(SIGCONT);
  nodes_[node].stopped = false;
}

void Trial::FaultZombie() {
  const std::vector<int> losable = LosableNodes(1);
  if (losable.empty()) {
    result_.faults.push_back("zombie (none allowed: the data lost since the last commit)");
    Trace("fault: zombie skipped: no node may be replaced before a newer commit");
    return;
  }
  const int node = losable[0];
  Node& n = nodes_[node];
  const int awake_ms = 500 + static_cast<int>(rng_() % 2500);
  const std::string old_address = n.address;
  ++generation_;
  const std::string new_root = absl::StrCat(root_.path(), "/z", generation_);
  std::filesystem::create_directories(new_root);
  const std::string new_address = absl::StrCat(n.host, ":", FreePort());
  result_.faults.push_back(absl::StrCat("zombie ", n.id, " (", old_address, " -> ", new_address,
                                        ", old one back after ", awake_ms, " ms)"));
  Trace(absl::StrCat("fault: SIGSTOP tesserad ", n.id, " at ", old_address,
                     " and SIGKILL its trainers; a replacement ", n.id, " on ", new_address,
                     " with an empty store takes its ranks; ", awake_ms,
                     " ms later the old one is SIGCONTed"));
  const std::vector<size_t> marks = LogSizes();
  Stop(node);
  std::vector<int> ranks;
  for (int r = 0; r < shape_.world(); ++r) {
    if (NodeOf(r) != node) {
      damage_.fragments_lost[r].insert(node);
      continue;
    }
    KillTrainer(r);
    damage_.owner_lost.insert(r);
    ranks.push_back(r);
  }
  if (!WaitForSuspicion(node, marks)) {
    n.daemon->Signal(SIGCONT);
    return;
  }
  std::unique_ptr<DaemonProcess> old = std::move(n.daemon);
  n.root = new_root;
  n.address = new_address;
  n.daemon = MakeDaemon(node);
  logs_.push_back(std::make_unique<DaemonLog>(absl::StrCat(n.id, "@z", generation_),
                                              n.daemon->log_path(), job_));
  n.log = logs_.back().get();
  zombies_.push_back(std::move(old));
  if (!StartDaemon(node)) {
    zombies_.back()->Signal(SIGCONT);
    return;
  }
  RestartRanks(ranks, false, false, "zombie replacement");
  Sleep(milliseconds(awake_ms));
  zombies_.back()->Signal(SIGCONT);
  Trace(absl::StrCat("the old ", n.id, " at ", old_address, " is running again (a zombie)"));
}

void Trial::FaultJobRestart() {
  const int want = static_cast<int>(rng_() % (shape_.m + 1));
  const std::vector<int> lost = LosableNodes(want);
  std::vector<std::string> names;
  for (int n : lost) names.push_back(nodes_[n].id);
  result_.faults.push_back(absl::StrCat(
      "job-restart", lost.empty() ? "" : absl::StrCat(" after losing ", absl::StrJoin(names, ","))));
  Trace(absl::StrCat("fault: SIGKILL every trainer",
                     lost.empty() ? "" : absl::StrCat(", lose ", absl::StrJoin(names, " and "),
                                                      " and start empty replacements"),
                     ", restart the whole job at once"));
  for (size_t r = 0; r < ranks_.size(); ++r) KillTrainer(static_cast<int>(r));
  LoseNodes(lost);
  for (int n : lost) {
    nodes_[n].daemon = MakeDaemon(n);
    if (!StartDaemon(n)) return;
  }
  RestartRanks(AllRanks(), true, false, "job-restart");
}

void Trial::FaultPartition() {
  const int node = static_cast<int>(rng_() % nodes_.size());
  const int ms = 1000 + static_cast<int>(rng_() % 4000);
  result_.faults.push_back(absl::StrCat("partition ", nodes_[node].id, " ", ms, " ms"));
  Trace(absl::StrCat("fault: cut ", nodes_[node].id, " off the network for ", ms, " ms"));
  std::string error;
  if (!net_->Isolate(node, true, &error)) {
    Fail("daemon", "cannot isolate a node: " + error);
    return;
  }
  nodes_[node].isolated = true;
  Sleep(milliseconds(ms));
  if (!net_->Isolate(node, false, &error)) Fail("daemon", "cannot join a node again: " + error);
  nodes_[node].isolated = false;
}

void Trial::FaultPartitionRestart() {
  const int node = static_cast<int>(rng_() % nodes_.size());
  const int ms = 2000 + static_cast<int>(rng_() % 3000);
  result_.faults.push_back(absl::StrCat("partition-restart ", nodes_[node].id, " ", ms, " ms"));
  Trace(absl::StrCat("fault: cut ", nodes_[node].id, " off the network, restart the whole job "
                     "meanwhile, join it again ", ms, " ms later"));
  std::string error;
  if (!net_->Isolate(node, true, &error)) {
    Fail("daemon", "cannot isolate a node: " + error);
    return;
  }
  nodes_[node].isolated = true;
  for (size_t r = 0; r < ranks_.size(); ++r) KillTrainer(static_cast<int>(r));
  const int64_t floor = StartRanks(AllRanks(), false);
  cut_off_ = nodes_[node].id;
  commits_at_restart_.clear();
  for (auto& log : logs_) commits_at_restart_[log->name()] = log->commits();
  Sleep(milliseconds(ms));
  if (!net_->Isolate(node, false, &error)) Fail("daemon", "cannot join a node again: " + error);
  nodes_[node].isolated = false;
  CheckRanks(AllRanks(), floor, true, false, "partition-restart");
  for (const auto& [who, restored] : behind_) {
    const int64_t without = FloorWithoutSuperseded(cut_off_);
    if (restored >= without) {
      Trace(absl::StrCat(who, " restored step ", restored, ", behind step ", floor, ": ",
                         cut_off_, " committed it as it was cut off and logged it superseded by "
                         "the majority's restore point"));
    } else {
      Fail("committed", absl::StrCat(who, " restored step ", restored, ", behind step ", floor,
                                     " which ", committed_by_, " had committed before it started ",
                                     "(", without, " without commits logged as superseded)",
                                     LogExcerpt({"committed step", "superseded", " E ", " W "})));
    }
  }
  behind_.clear();
  cut_off_.clear();
}

void Trial::FaultLinkCut() {
  const int a = static_cast<int>(rng_() % nodes_.size());
  const int b = (a + 1 + static_cast<int>(rng_() % (nodes_.size() - 1))) % nodes_.size();
  const int ms = 1000 + static_cast<int>(rng_() % 5000);
  const bool restart = rng_() % 2 == 0;
  result_.faults.push_back(absl::StrCat("link-cut ", nodes_[a].id, "-", nodes_[b].id, " ", ms,
                                        " ms", restart ? " with a job restart" : ""));
  Trace(absl::StrCat("fault: cut the link between ", nodes_[a].id, " and ", nodes_[b].id,
                     restart ? ", restart the whole job meanwhile," : "", " mend it ", ms,
                     " ms later (both still reach every other node)"));
  std::string error;
  if (!net_->Cut(a, b, true, &error)) {
    Fail("daemon", "cannot cut a link: " + error);
    return;
  }
  int64_t floor = -1;
  if (restart) {
    for (size_t r = 0; r < ranks_.size(); ++r) KillTrainer(static_cast<int>(r));
    floor = StartRanks(AllRanks(), false);
  }
  Sleep(milliseconds(ms));
  if (!net_->Cut(a, b, false, &error)) Fail("daemon", "cannot mend a link: " + error);
  if (restart) CheckRanks(AllRanks(), floor, true, false, "link-cut");
}

// ------------------------------------------------------------------------------------------------
// Waiting and checking

int64_t Trial::Committed() {
  std::set<LoggedCommit> superseded;
  for (auto& log : logs_) {
    log->Poll();
    superseded.insert(log->superseded().begin(), log->superseded().end());
  }
  LoggedCommit newest;
  for (auto& log : logs_) {
    // Newest first: the first one not superseded is this log's newest that still stands.
    for (auto it = log->commits().rbegin(); it != log->commits().rend(); ++it) {
      if (superseded.count(*it) > 0) continue;
      if (newest < *it) {
        newest = *it;
        committed_by_ = log->name();
      }
      break;
    }
  }
  return newest.step;
}

int64_t Trial::FloorWithoutSuperseded(const std::string& cut_off) {
  std::set<LoggedCommit> superseded;
  for (auto& log : logs_) {
    log->Poll();
    superseded.insert(log->superseded().begin(), log->superseded().end());
  }
  LoggedCommit newest;
  for (const auto& [name, commits] : commits_at_restart_) {
    for (const LoggedCommit& c : commits) {
      if (name == cut_off && superseded.count(c) > 0) continue;
      newest = std::max(newest, c);
    }
  }
  return newest.step;
}

int64_t Trial::MaxSnapshotStep() const {
  int64_t newest = -1;
  for (const auto& r : ranks_) {
    if (r.training) newest = std::max(newest, r.last_snapshot);
  }
  return newest;
}

void Trial::WaitFor(Clock::duration timeout, const std::string& what,
                    const std::function<bool()>& done) {
  const auto deadline = Clock::now() + timeout;
  while (true) {
    Pump();
    CheckDaemons();
    if (done()) return;
    if (Clock::now() >= deadline) {
      Fail("hang", absl::StrCat("waited ", std::chrono::duration_cast<seconds>(timeout).count(),
                                " s for ", what, LogExcerpt({}), ProcessStates()));
      halted_ = true;
      return;
    }
    std::this_thread::sleep_for(milliseconds(20));
  }
}

bool Trial::WaitForProgress(const std::string& after) {
  for (int i = 0; i < 3; ++i) Pump();
  const int64_t mark = std::max(MaxSnapshotStep(), Committed());
  const auto t = Clock::now();
  int64_t committed = -1;
  const auto deadline = t + seconds(options_.progress_deadline_s);
  while (true) {
    Pump();
    CheckDaemons();
    // A rank whose trainer died (a failure already reported) is restarted, as a launcher
    // would, a few times.
    for (size_t r = 0; r < ranks_.size(); ++r) {
      if (ranks_[r].training || ranks_[r].relaunches >= 2) continue;
      ++ranks_[r].relaunches;
      KillTrainer(static_cast<int>(r));
      RestartRanks({static_cast<int>(r)}, false, false, "relaunch of a failed trainer");
      if (halted_) return false;
    }
    committed = Committed();
    if (committed > mark) break;
    if (Clock::now() >= deadline) {
      Fail("progress",
           absl::StrCat("no step after ", mark, " (the newest snapshotted when ", after,
                        " healed) was committed within ", options_.progress_deadline_s,
                        " s; newest committed: ", committed, LogExcerpt({}), ProcessStates()));
      halted_ = true;
      return false;
    }
    std::this_thread::sleep_for(milliseconds(50));
  }
  damage_ = Damage{};  // the newly committed step was snapshotted after the damage
  Trace(absl::StrCat("step ", committed, " committed (after ", after, ": steps up to ", mark,
                     " were snapshotted or committed when it healed; ",
                     std::chrono::duration_cast<milliseconds>(Clock::now() - t).count(), " ms)"));
  return true;
}

void Trial::CheckDaemons() {
  for (auto& n : nodes_) {
    if (!n.daemon || !n.daemon->running()) continue;
    const int code = n.daemon->Poll();
    if (code >= 0) {
      Fail("daemon", absl::StrCat(n.id, " exited on its own with ", code, LogExcerpt({})));
      halted_ = true;
      n.daemon->Kill();
    }
  }
}

void Trial::Sleep(milliseconds d) {
  const auto until = Clock::now() + d;
  while (Clock::now() < until) {
    Pump();
    std::this_thread::sleep_for(milliseconds(20));
  }
}

void Trial::Fail(const std::string& check, const std::string& detail) {
  result_.failures.push_back({check, detail});
  Say(absl::StrCat("FAIL [", check, "] ", detail));
}

std::string Trial::LogExcerpt(const std::vector<std::string>& needles) const {
  std::string out;
  for (const auto& log : logs_) {
    log->Poll();
    const auto lines = log->Lines(needles, needles.empty() ? 12 : 8);
    if (lines.empty()) continue;
    absl::StrAppend(&out, "\n    ", log->name(), " log:");
    for (const auto& l : lines) absl::StrAppend(&out, "\n      ", l.substr(0, 400));
  }
  return out;
}

// The scheduler state letter of /proc/.../stat (R, S, D, T...), '?' when it cannot be read.
char SchedulerState(const std::string& stat_path) {
  const std::string stat = ReadFile(stat_path);
  const size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() ? stat[paren + 2] : '?';
}

std::string Trial::ProcessStates() const {
  std::string out = "\n    processes:";
  auto describe = [&](const std::string& name, const DaemonProcess* d) {
    if (d == nullptr || d->pid() <= 0) return;
    const std::string task_dir = absl::StrCat("/proc/", d->pid(), "/task");
    std::map<std::string, int> states;  // "S futex_wait_queue" -> threads
    std::error_code ec;
    for (const auto& task : std::filesystem::directory_iterator(task_dir, ec)) {
      const char state = SchedulerState(task.path().string() + "/stat");
      if (state == '?') continue;
      const std::string wchan = ReadFile(task.path().string() + "/wchan");
      states[absl::StrCat(std::string(1, state), " ", wchan.empty() ? "-" : wchan)]++;
    }
    absl::StrAppend(&out, "\n      ", name, " pid ", d->pid(), ":");
    if (states.empty()) absl::StrAppend(&out, " gone");
    for (const auto& [state, threads] : states) {
      absl::StrAppend(&out, " ", threads, "x[", state, "]");
    }
  };
  for (const Node& n : nodes_) describe(n.id, n.daemon.get());
  for (const auto& z : zombies_) describe("zombie", z.get());
  return out;
}

void Trial::Stop(int node) {
  DaemonProcess& d = *nodes_[node].daemon;
  d.Signal(SIGSTOP);
  const std::string stat_path = absl::StrCat("/proc/", d.pid(), "/stat");
  const auto sent = Clock::now();
  for (;;) {
    const char state = SchedulerState(stat_path);
    const auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - sent);
    if (state == 'T' || state == 't') {
      if (waited > milliseconds(100)) {
        Trace(absl::StrCat(nodes_[node].id, " stopped ", waited.count(), " ms after SIGSTOP"));
      }
      return;
    }
    if (waited >= seconds(2)) {
      Trace(absl::StrCat(nodes_[node].id, " (pid ", d.pid(), ") is not stopped 2 s after SIGSTOP ",
                         "(state ", std::string(1, state), ")", ProcessStates()));
      return;
    }
    std::this_thread::sleep_for(milliseconds(5));
  }
}

void Trial::Say(const std::string& line) {
  std::printf("[%7.2fs] %s\n", std::chrono::duration<double>(Clock::now() - start_).count(),
              line.c_str());
  std::fflush(stdout);
}

TrialResult Trial::Run() {
  result_.seed = seed_;
  if (Setup()) {
    if (!halted_) WaitForProgress("the job's start");
    int faults = options_.min_faults +
                 static_cast<int>(rng_() % (options_.max_faults - options_.min_faults + 1));
    std::vector<FaultKind> plan = options_.script;
    if (plan.empty()) {
      for (int i = 0; i < faults; ++i) plan.push_back(Draw());
    }
    for (size_t i = 0; i < plan.size() && !halted_; ++i) {
      if (!Allowed(plan[i])) {
        Trace(absl::StrCat("fault ", FaultName(plan[i]), " skipped: ", options_.no_partitions));
        continue;
      }
      // Each fault draws its targets from its own generator, so that a script replays the same
      // targets whatever the faults before it found (how many files there were to flip...).
      rng_.seed(seed_ * 1000003 + i + 1);
      Inject(plan[i]);
      // Most faults are followed by a commit of a step taken after them; some by the next
      // fault at once, so that damage accumulates (within what the code promises to survive).
      if (!halted_ && rng_() % 10 >= 3) WaitForProgress(FaultName(plan[i]));
    }
    // The whole job restarts on whatever the daemons hold, and every rank checks it.
    for (auto& n : nodes_) {
      if (n.stopped) n.daemon->Signal(SIGCONT);
      n.stopped = false;
      std::string error;
      if (n.isolated && net_) net_->Isolate(static_cast<int>(&n - nodes_.data()), false, &error);
    }
    for (size_t r = 0; r < ranks_.size(); ++r) KillTrainer(static_cast<int>(r));
    halted_ = false;
    RestartRanks(AllRanks(), true, true, "final restart");
    CheckDaemons();
    for (auto& log : logs_) {
      log->Poll();
      result_.fragments_rerouted += log->reroutes();
    }
  }
  result_.seconds = std::chrono::duration<double>(Clock::now() - start_).count();
  if (!result_.failures.empty() && !options_.keep_logs_dir.empty()) KeepLogs();
  return result_;
}

void Trial::KeepLogs() {
  // Named by seed and script: regression cases run one seed with several scripts.
  std::string to = absl::StrCat(options_.keep_logs_dir, "/seed-", seed_);
  for (FaultKind kind : options_.script) absl::StrAppend(&to, "-", FaultName(kind));
  std::error_code ec;
  std::filesystem::create_directories(to, ec);
  for (const auto& entry : std::filesystem::recursive_directory_iterator(root_.path(), ec)) {
    const std::string name = entry.path().filename().string();
    if (!absl::EndsWith(name, ".log") && !absl::EndsWith(name, ".err")) continue;
    std::string relative = entry.path().string().substr(root_.path().size() + 1);
    std::replace(relative.begin(), relative.end(), '/', '_');
    std::filesystem::copy_file(entry.path(), to + "/" + relative,
                               std::filesystem::copy_options::overwrite_existing, ec);
  }
  Say("logs kept in " + to);
}

}  // namespace

const char* FaultName(FaultKind kind) { return kFaultNames[static_cast<int>(kind)]; }

bool ParseFaultKind(const std::string& name, FaultKind* kind) {
  for (int i = 0; i < kFaultKinds; ++i) {
    if (name == kFaultNames[i]) {
      *kind = static_cast<FaultKind>(i);
      return true;
    }
  }
  return false;
}

std::string ProbePartitions() {
  TempRoot scratch;
  return NetLab::Probe(scratch.path());
}

TrialResult RunTrial(uint64_t seed, const TrialOptions& options) {
  Trial trial(seed, options);
  TrialResult result = trial.Run();
  const TrialOptions defaults;
  result.rerun = absl::StrCat("tools/campaign.sh --seed ", seed, " --trials 1");
  if (!options.script.empty()) {
    std::vector<std::string> names;
    for (FaultKind kind : options.script) names.push_back(FaultName(kind));
    absl::StrAppend(&result.rerun, " --script ", absl::StrJoin(names, ","));
  } else if (options.min_faults != defaults.min_faults ||
             options.max_faults != defaults.max_faults) {
    absl::StrAppend(&result.rerun, " --min-faults ", options.min_faults, " --max-faults ",
                    options.max_faults);
  }
  if (options.skip_when_busy) absl::StrAppend(&result.rerun, " --skip-when-busy");
  if (options.tls != "drawn") absl::StrAppend(&result.rerun, " --tls ", options.tls);
  if (!options.no_partitions.empty()) absl::StrAppend(&result.rerun, " --no-partitions");
  return result;
}

std::vector<TrialResult> RunCampaign(uint64_t seed, int trials, double budget_s,
                                     const TrialOptions& options) {
  std::vector<TrialResult> results;
  const auto start = Clock::now();
  for (int i = 0; i < trials; ++i) {
    if (i > 0 && budget_s > 0 &&
        std::chrono::duration<double>(Clock::now() - start).count() > budget_s) {
      std::printf("campaign: time budget of %.0f s spent after %d trial(s)\n", budget_s, i);
      break;
    }
    const uint64_t trial_seed = seed + static_cast<uint64_t>(i);
    std::printf("\n=== trial %d/%d, seed %" PRIu64 " ===\n", i + 1, trials, trial_seed);
    std::fflush(stdout);
    results.push_back(RunTrial(trial_seed, options));
    const TrialResult& r = results.back();
    std::set<std::string> checks;
    for (const auto& f : r.failures) checks.insert(f.check);
    std::printf("=== trial seed %" PRIu64 ": %s in %.1f s; faults: %s\n", trial_seed,
                r.failures.empty() ? "PASS"
                                   : absl::StrCat("FAIL (", absl::StrJoin(checks, ", "), ")").c_str(),
                r.seconds, absl::StrJoin(r.faults, "; ").c_str());
    if (!r.failures.empty()) {
      std::printf("    rerun exactly this trial: %s\n", r.rerun.c_str());
    }
    std::fflush(stdout);
  }
  PrintTable(results);
  return results;
}

void PrintTable(const std::vector<TrialResult>& results) {
  int failed = 0;
  std::map<FaultKind, int> injected, in_failed;
  std::map<std::string, std::vector<uint64_t>> by_check;
  for (const auto& r : results) {
    if (!r.failures.empty()) ++failed;
    for (const auto& [kind, count] : r.fault_counts) {
      injected[kind] += count;
      if (!r.failures.empty()) in_failed[kind] += count;
    }
    std::set<std::string> checks;
    for (const auto& f : r.failures) checks.insert(f.check);
    for (const auto& c : checks) by_check[c].push_back(r.seed);
  }
  std::printf("\n%zu trial(s): %zu passed, %d failed\n\n", results.size(),
              results.size() - static_cast<size_t>(failed), failed);
  std::printf("%-18s %9s %17s\n", "fault", "injected", "in failed trials");
  for (int i = 0; i < kFaultKinds; ++i) {
    const auto kind = static_cast<FaultKind>(i);
    std::printf("%-18s %9d %17d\n", FaultName(kind), injected[kind], in_failed[kind]);
  }
  std::printf("\n%-18s %9s  %s\n", "failed check", "trials", "seeds");
  for (const char* check :
       {"same-step", "history", "committed", "restore", "hang", "progress", "trainer", "daemon"}) {
    const auto& seeds = by_check[check];
    std::printf("%-18s %9zu  %s\n", check, seeds.size(), absl::StrJoin(seeds, " ").c_str());
  }
  std::fflush(stdout);
}

}  // namespace tessera::testing
