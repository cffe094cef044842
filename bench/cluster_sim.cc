// cluster_sim: N real Swim cores (daemon/membership/swim.h) over a simulated network and clock
// (daemon/membership/swim_sim.h), deterministic from the seed it prints. For each N it reports
// the steady cost of membership per daemon, how long a killed daemon takes to be suspected and
// then known DEAD by every other member, and the largest message in piggybacked updates.
//
//   bazel run -c opt //bench:cluster_sim -- [--nodes=100,1000,10000] [--seed=S] [--rtt_ms=2]
//       [--loss=0.01] [--period_ms=1000] [--ack_timeout_ms=500] [--indirect_probes=3]
//       [--suspicion_mult=4] [--retransmit_mult=4] [--max_updates=16] [--steady_periods=20]
//
// The cluster starts converged (Swim::BootstrapFrom: every daemon knows every other, nothing
// left to gossip), each daemon with 3 random seed addresses and its own random period phase.
// Then: `warmup` periods, `steady_periods` periods measured, one daemon killed (silently, as a
// hung host: no "connection refused"), and the run goes on until every other daemon holds it
// DEAD or 3x the suspicion timeout has passed.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <queue>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "daemon/coordination/job_coordinator.h"
#include "daemon/coordination/protection.h"
#include "daemon/membership/swim.h"
#include "daemon/membership/swim_sim.h"

namespace tessera {
namespace {

struct Flags {
  std::vector<int> nodes = {100, 1000, 10000};
  uint64_t seed = 0;  // 0: random, printed
  int64_t rtt_ms = 2;
  double loss = 0.01;
  int64_t period_ms = 1000;
  int64_t ack_timeout_ms = 500;
  int indirect_probes = 3;
  int suspicion_mult = 4;
  int retransmit_mult = 4;
  int max_updates = 16;
  int warmup_periods = 5;
  int steady_periods = 20;
  int job_ranks = 256;   // the simulated job (8 ranks a node)
  int commit_steps = 10;
};

// What one run measured.
struct Result {
  int nodes = 0;
  double sent_per_s = 0;       // messages (requests and replies) per daemon per second, steady
  double received_per_s = 0;
  double updates_per_message = 0;  // steady
  int64_t first_suspect_ms = -1;   // after the kill
  int64_t all_suspect_ms = -1;     // every other daemon holds it suspect or dead
  int64_t all_dead_ms = -1;        // every other daemon holds it dead
  int64_t dead_timeout_periods = 0;
  size_t max_updates = 0;          // the most updates one message carried, whole run
  uint64_t false_suspicions = 0;   // suspicions raised about daemons that were running
  uint64_t refutations = 0;
  double wall_s = 0;
  double peak_rss_mib = 0;
  // Commit latency from the step's last protection, over commit_steps steps with no failure:
  int64_t commit_median_ms = -1, commit_max_ms = -1;      // the coordinator commits
  int64_t known_median_ms = -1, known_max_ms = -1;        // every node of the job knows it
  double commit_messages_per_rank = 0;                     // per step
  // The step whose coordinator was killed right after the last protection:
  int64_t takeover_commit_ms = -1;
};

std::string NodeId(int i) { return absl::StrCat("n", i); }
// At most 15 characters: short-string storage, no allocation per copy.
std::string NodeAddress(int i) {
  return absl::StrCat("10.", i / 65536, ".", (i / 256) % 256, ".", i % 256, ":70");
}

// The per-job commit protocol (docs/PROTOCOL.md) over the same simulated network, with the real
// JobCoordinator and the real coordinator choice (CoordinatorFor, rendezvous-hashed over the
// owner's own live view from its Swim). Each owner reports its rank's protected shard to the
// coordinator and re-sends every report_interval_ms until it hears the step committed (a reply or
// a push); the coordinator commits when every rank has reported and pushes the commit to the
// job's nodes. Messages take the network's one-way time and are lost at its rate; a killed
// daemon neither answers nor sends. Membership keeps running underneath (sim.RunUntil), so a
// coordinator that dies is replaced once the owners' views stop listing it.
class CommitSim {
 public:
  struct Options {
    int ranks = 256;
    int ranks_per_node = 8;
    int holders = 5;                   // k + m fragment holders per shard
    int64_t protect_spread_ms = 100;   // protections of one step end over this window
    int64_t report_interval_ms = 500;  // an owner re-sends its open reports this often
  };
  struct StepResult {
    int64_t step = 0;
    int64_t last_protected_ms = 0;  // when the step's last shard was protected
    int64_t committed_ms = -1;      // when the coordinator committed it
    int64_t all_known_ms = -1;      // when every node of the job knew it
    std::string coordinator;        // who committed it
    uint64_t messages = 0;          // reports, replies and pushes for this step
  };

  CommitSim(SwimSimulation* sim, const Flags& flags, Options options, uint64_t seed)
      : sim_(sim), flags_(flags), options_(options), rng_(seed) {
    // The job's nodes: distinct random daemons, ranks_per_node ranks each.
    const int nodes = (options_.ranks + options_.ranks_per_node - 1) / options_.ranks_per_node;
    std::vector<int> order(sim_->size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
    std::shuffle(order.begin(), order.end(), rng_);
    // The coordinator is not one of the owners, so that killing it loses no rank: the job's
    // nodes are drawn from the other daemons.
    const int coordinator = CoordinatorSeenBy(order[0]);
    order.erase(std::find(order.begin(), order.end(), coordinator));
    const int used = std::min<int>(nodes, static_cast<int>(order.size()));
    for (int r = 0; r < options_.ranks; ++r) {
      owner_of_rank_.push_back(order[r / options_.ranks_per_node % used]);
    }
    job_nodes_.assign(order.begin(), order.begin() + used);
  }

  bool IsJobNode(int daemon) const {
    return std::find(job_nodes_.begin(), job_nodes_.end(), daemon) != job_nodes_.end();
  }

  // The daemon this job's coordinator is, as `from` sees the membership now.
  int CoordinatorSeenBy(int from) const {
    std::vector<std::string> live = {NodeId(from)};
    for (const Swim::MemberView& m : sim_->swim(from).Members()) {
      if (m.state == SwimState::kAlive && !m.lost) live.push_back(m.node_id);
    }
    const std::string id = CoordinatorFor(kJob, std::move(live));
    return std::stoi(id.substr(1));
  }

  // Runs one step: protections end over the next protect_spread_ms; kill_coordinator_after_ms
  // >= 0 kills the coordinator the owners pick that long after the last protection. Returns when
  // every job node knows the commit, or after `deadline_ms` of simulated time.
  StepResult RunStep(int64_t kill_coordinator_after_ms, int64_t deadline_ms) {
    StepResult result;
    result.step = ++step_;
    const int64_t start = sim_->now_ms();
    std::uniform_int_distribution<int64_t> spread(0, options_.protect_spread_ms);
    open_.assign(options_.ranks, true);
    knows_.clear();
    messages_ = 0;
    for (int r = 0; r < options_.ranks; ++r) {
      const int64_t at = start + spread(rng_);
      result.last_protected_ms = std::max(result.last_protected_ms, at);
      Schedule(at, [this, r] { SendReport(r); });
    }
    if (kill_coordinator_after_ms >= 0) {
      Schedule(result.last_protected_ms + kill_coordinator_after_ms, [this] {
        const int victim = CoordinatorSeenBy(owner_of_rank_[0]);
        if (!sim_->killed(victim)) sim_->Kill(victim);
      });
    }
    committed_ms_ = -1;
    committer_.clear();
    while (!events_.empty() && sim_->now_ms() < start + deadline_ms) {
      Event e = events_.top();
      events_.pop();
      sim_->RunUntil(std::max(e.at_ms, sim_->now_ms()));  // membership moves on underneath
      e.run();
      if (AllKnow()) break;
    }
    if (committed_ms_ >= 0) result.committed_ms = committed_ms_ - result.last_protected_ms;
    if (AllKnow()) result.all_known_ms = sim_->now_ms() - result.last_protected_ms;
    result.coordinator = committer_;
    result.messages = messages_;
    while (!events_.empty()) events_.pop();  // re-sends of a finished step
    return result;
  }

 private:
  static constexpr const char* kJob = "sim-job";
  struct Event {
    int64_t at_ms;
    uint64_t order;
    std::function<void()> run;
    bool operator>(const Event& o) const {
      return at_ms != o.at_ms ? at_ms > o.at_ms : order > o.order;
    }
  };

  void Schedule(int64_t at_ms, std::function<void()> run) {
    events_.push(Event{at_ms, order_++, std::move(run)});
  }
  // A one-way message from `from` to `to`: `deliver` runs on arrival unless it is lost or an end
  // is down.
  void Transmit(int from, int to, std::function<void()> deliver) {
    ++messages_;
    std::uniform_real_distribution<double> coin(0, 1);
    const int64_t jitter = flags_.rtt_ms - flags_.rtt_ms / 2;
    const int64_t delay =
        flags_.rtt_ms / 2 + (jitter > 0 ? static_cast<int64_t>(rng_() % (jitter + 1)) : 0);
    if (sim_->killed(from) || coin(rng_) < flags_.loss) return;
    Schedule(sim_->now_ms() + delay, [this, to, deliver = std::move(deliver)] {
      if (!sim_->killed(to)) deliver();
    });
  }

  void SendReport(int rank) {
    if (!open_[rank]) return;
    const int owner = owner_of_rank_[rank];
    if (knows_.count(owner)) {  // a push told this owner already
      open_[rank] = false;
      return;
    }
    const int coordinator = CoordinatorSeenBy(owner);
    ProtectedReport report;
    report.job_id = kJob;
    report.world_size = options_.ranks;
    report.epoch = 1;
    report.rank = rank;
    report.step = step_;
    report.previous_step = step_ - 1;
    report.shard_crc32c = static_cast<uint32_t>(rank * 2654435761u + step_);
    report.shard_bytes = 1 << 20;
    report.owner = NodeId(owner);
    // Fragments go to other nodes of the job (the job's nodes are who the commit is pushed to).
    for (size_t h = 1; h < job_nodes_.size() && report.holders.size() < size_t(options_.holders);
         ++h) {
      const int holder = job_nodes_[(rank + h) % job_nodes_.size()];
      if (holder != owner) report.holders.push_back(NodeId(holder));
    }
    Transmit(owner, coordinator, [this, coordinator, owner, report] {
      JobCoordinator::Outcome outcome = coordinators_[coordinator].Report(report);
      if (outcome.committed_now) {
        committed_ms_ = sim_->now_ms();
        committer_ = NodeId(coordinator);
        knows_.insert(coordinator);
        for (const std::string& node : outcome.push_to) {
          const int to = std::stoi(node.substr(1));
          if (to != coordinator) Transmit(coordinator, to, [this, to] { knows_.insert(to); });
        }
      }
      if (outcome.state.committed.step >= step_) {
        Transmit(coordinator, owner, [this, owner] { knows_.insert(owner); });
      }
    });
    Schedule(sim_->now_ms() + options_.report_interval_ms, [this, rank] { SendReport(rank); });
  }

  bool AllKnow() const {
    for (int n : job_nodes_) {
      if (!sim_->killed(n) && knows_.count(n) == 0) return false;
    }
    return true;
  }

  SwimSimulation* const sim_;
  const Flags& flags_;
  const Options options_;
  std::mt19937_64 rng_;
  std::vector<int> owner_of_rank_;
  std::vector<int> job_nodes_;
  std::map<int, JobCoordinator> coordinators_;  // by daemon: each keeps its own soft state
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  uint64_t order_ = 0;
  int64_t step_ = 0;
  std::vector<bool> open_;
  std::set<int> knows_;
  int64_t committed_ms_ = -1;
  std::string committer_;
  uint64_t messages_ = 0;
};

double PeakRssMib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;
}


Result RunOnce(const Flags& flags, int n, uint64_t seed) {
  const auto wall_start = std::chrono::steady_clock::now();
  Result r;
  r.nodes = n;
  SwimSimulation::Options so;
  so.seed = seed;
  so.one_way_ms = flags.rtt_ms / 2;
  so.jitter_ms = flags.rtt_ms - flags.rtt_ms / 2;  // one way: rtt/2 .. rtt
  so.loss_rate = flags.loss;
  SwimSimulation sim(so);
  std::mt19937_64 rng(seed);

  // Who holds the victim suspect / dead, counted from the events.
  int victim = -1;
  int64_t killed_at = -1;
  std::vector<uint8_t> saw_suspect(n, 0), saw_dead(n, 0);
  int suspecting = 0, dead_holders = 0;
  uint64_t false_suspicions = 0;

  std::vector<SwimUpdate> everyone;
  for (int i = 0; i < n; ++i) {
    everyone.push_back(SwimUpdate{SwimState::kAlive, NodeId(i), 1000 + static_cast<uint64_t>(i),
                                  0, NodeAddress(i)});
  }
  for (int i = 0; i < n; ++i) {
    Swim::Options o;
    o.self_id = NodeId(i);
    o.self_incarnation = 1000 + i;
    o.self_address = NodeAddress(i);
    o.protocol_period_ms = flags.period_ms;
    o.ack_timeout_ms = flags.ack_timeout_ms;
    o.indirect_probes = flags.indirect_probes;
    o.suspicion_mult = flags.suspicion_mult;
    o.retransmit_mult = flags.retransmit_mult;
    o.max_updates_per_message = flags.max_updates;
    o.random_seed = seed ^ (0x9e3779b97f4a7c15ULL * (i + 1));
    o.track_last_heard = false;
    for (int s = 0; s < 3 && n > 1; ++s) o.seeds.push_back(NodeAddress(rng() % n));
    o.on_event = [&, i](const Swim::Event& e) {
      const bool about_victim = victim >= 0 && e.node_id == NodeId(victim);
      if (e.kind == Swim::Event::Kind::kSuspect && e.by_self && !about_victim) {
        ++false_suspicions;
      }
      if (!about_victim || killed_at < 0) return;
      const int64_t since = sim.now_ms() - killed_at;
      if ((e.kind == Swim::Event::Kind::kSuspect || e.kind == Swim::Event::Kind::kDead) &&
          !saw_suspect[i]) {
        saw_suspect[i] = 1;
        if (r.first_suspect_ms < 0) r.first_suspect_ms = since;
        if (++suspecting == n - 1) r.all_suspect_ms = since;
      }
      if (e.kind == Swim::Event::Kind::kDead && !saw_dead[i]) {
        saw_dead[i] = 1;
        if (++dead_holders == n - 1) r.all_dead_ms = since;
      }
    };
    sim.Add(std::move(o), static_cast<int64_t>(rng() % flags.period_ms));
    if (i == 0) {
      sim.swim(0).Bootstrap(everyone);
    } else {
      sim.swim(i).BootstrapFrom(sim.swim(0));
    }
  }
  everyone.clear();
  everyone.shrink_to_fit();

  auto run_periods = [&](int periods, const std::function<bool()>& done) {
    for (int p = 0; p < periods; ++p) {
      const bool finished = sim.RunUntil(sim.now_ms() + flags.period_ms, done);
      if (finished) return true;
    }
    return false;
  };
  auto never = [] { return false; };
  run_periods(flags.warmup_periods, never);
  uint64_t sent0 = 0, received0 = 0, updates0 = 0;
  for (int i = 0; i < n; ++i) {
    const Swim::Stats& s = sim.swim(i).stats();
    sent0 += s.messages_sent();
    received0 += s.messages_received();
    updates0 += s.updates_sent;
  }
  run_periods(flags.steady_periods, never);
  uint64_t sent = 0, received = 0, updates = 0;
  for (int i = 0; i < n; ++i) {
    const Swim::Stats& s = sim.swim(i).stats();
    sent += s.messages_sent();
    received += s.messages_received();
    updates += s.updates_sent;
  }
  const double daemon_seconds = double(n) * flags.steady_periods * flags.period_ms / 1000.0;
  r.sent_per_s = (sent - sent0) / daemon_seconds;
  r.received_per_s = (received - received0) / daemon_seconds;
  r.updates_per_message = sent > sent0 ? double(updates - updates0) / (sent - sent0) : 0;

  CommitSim::Options co;
  co.ranks = flags.job_ranks;
  co.report_interval_ms = flags.period_ms;  // the daemon's default: one protocol period
  CommitSim commits(&sim, flags, co, seed ^ 0xC0FFEE);
  std::vector<int64_t> committed, known;
  uint64_t commit_messages = 0;
  for (int step = 0; step < flags.commit_steps; ++step) {
    const CommitSim::StepResult s = commits.RunStep(-1, 60 * flags.period_ms);
    committed.push_back(s.committed_ms);
    known.push_back(s.all_known_ms);
    commit_messages += s.messages;
  }
  auto median_max = [](std::vector<int64_t> v, int64_t* median, int64_t* max) {
    std::sort(v.begin(), v.end());
    if (v.empty() || v.front() < 0) return;  // a step that never committed: reported as never
    *median = v[v.size() / 2];
    *max = v.back();
  };
  median_max(committed, &r.commit_median_ms, &r.commit_max_ms);
  median_max(known, &r.known_median_ms, &r.known_max_ms);
  r.commit_messages_per_rank =
      double(commit_messages) / std::max(1, flags.commit_steps) / std::max(1, flags.job_ranks);

  // The daemon killed for detection holds no rank of the job (a dead owner's ranks could never
  // report again, and the coordinator's takeover is measured below on its own).
  do {
    victim = static_cast<int>(rng() % n);
  } while (commits.IsJobNode(victim) && n > flags.job_ranks / 8 + 2);
  killed_at = sim.now_ms();
  sim.Kill(victim);
  saw_suspect[victim] = saw_dead[victim] = 1;  // not counted: n - 1 others
  int log2 = 0;
  while ((int64_t{1} << log2) < n + 1) ++log2;
  r.dead_timeout_periods = int64_t{flags.suspicion_mult} * log2;
  run_periods(static_cast<int>(3 * r.dead_timeout_periods + 20),
              [&] { return dead_holders == n - 1; });

  r.false_suspicions = false_suspicions;  // before the coordinator below is killed
  // A coordinator lost right after the last protection: the owners re-send to the member their
  // views rank next once they stop listing it as live.
  const CommitSim::StepResult takeover =
      commits.RunStep(/*kill_coordinator_after_ms=*/0, 3 * r.dead_timeout_periods * flags.period_ms +
                                                           60 * flags.period_ms);
  r.takeover_commit_ms = takeover.committed_ms;

  for (int i = 0; i < n; ++i) r.refutations += sim.swim(i).stats().refutations;
  r.max_updates = sim.counters().max_updates;
  r.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  r.peak_rss_mib = PeakRssMib();
  return r;
}

std::string Periods(int64_t ms, int64_t period_ms) {
  if (ms < 0) return "never";
  char text[64];
  std::snprintf(text, sizeof(text), "%.1f (%lld ms)", double(ms) / period_ms,
                static_cast<long long>(ms));
  return text;
}

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    bool ok = eq != std::string::npos;
    if (key == "--nodes") {
      f->nodes.clear();
      for (absl::string_view v : absl::StrSplit(value, ',')) {
        int n = 0;
        ok = ok && absl::SimpleAtoi(v, &n) && n >= 2;
        f->nodes.push_back(n);
      }
    } else if (key == "--seed") {
      ok = ok && absl::SimpleAtoi(value, &f->seed);
    } else if (key == "--rtt_ms") {
      ok = ok && absl::SimpleAtoi(value, &f->rtt_ms) && f->rtt_ms >= 0;
    } else if (key == "--loss") {
      ok = ok && absl::SimpleAtod(value, &f->loss) && f->loss >= 0 && f->loss < 1;
    } else if (key == "--period_ms") {
      ok = ok && absl::SimpleAtoi(value, &f->period_ms) && f->period_ms >= 1;
    } else if (key == "--ack_timeout_ms") {
      ok = ok && absl::SimpleAtoi(value, &f->ack_timeout_ms);
    } else if (key == "--indirect_probes") {
      ok = ok && absl::SimpleAtoi(value, &f->indirect_probes);
    } else if (key == "--suspicion_mult") {
      ok = ok && absl::SimpleAtoi(value, &f->suspicion_mult);
    } else if (key == "--retransmit_mult") {
      ok = ok && absl::SimpleAtoi(value, &f->retransmit_mult);
    } else if (key == "--max_updates") {
      ok = ok && absl::SimpleAtoi(value, &f->max_updates);
    } else if (key == "--job_ranks") {
      ok = ok && absl::SimpleAtoi(value, &f->job_ranks) && f->job_ranks >= 1 &&
           f->job_ranks <= 65536;
    } else if (key == "--commit_steps") {
      ok = ok && absl::SimpleAtoi(value, &f->commit_steps) && f->commit_steps >= 1 &&
           f->commit_steps <= 1000;
    } else if (key == "--steady_periods") {
      ok = ok && absl::SimpleAtoi(value, &f->steady_periods) && f->steady_periods >= 1;
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr,
                   "cluster_sim: bad argument '%s'\nusage: %s [--nodes=100,1000,10000] "
                   "[--seed=S] [--rtt_ms=2] [--loss=0.01] [--period_ms=1000] "
                   "[--ack_timeout_ms=500] [--indirect_probes=3] [--suspicion_mult=4] "
                   "[--retransmit_mult=4] [--max_updates=16] [--steady_periods=20] "
                   "[--job_ranks=256] [--commit_steps=10]\n",
                   arg.c_str(), argv[0]);
      return false;
    }
  }
  return true;
}

int Main(int argc, char** argv) {
  Flags f;
  if (!ParseFlags(argc, argv, &f)) return 2;
  if (f.seed == 0) f.seed = std::random_device{}() | 1;
  // The options as a daemon would check them (a bad ack timeout, a multiplier out of range).
  Swim::Options check;
  check.self_id = "check";
  check.self_incarnation = 1;
  check.self_address = "check:1";
  check.protocol_period_ms = f.period_ms;
  check.ack_timeout_ms = f.ack_timeout_ms;
  check.indirect_probes = f.indirect_probes;
  check.suspicion_mult = f.suspicion_mult;
  check.retransmit_mult = f.retransmit_mult;
  check.max_updates_per_message = f.max_updates;
  check.send = [](const std::string&, SwimMessage&&) {};
  if (absl::Status s = Swim::ValidateOptions(check); !s.ok()) {
    std::fprintf(stderr, "cluster_sim: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  std::printf("cluster_sim seed=%llu (--seed=%llu repeats it): RTT %lld ms (one way %lld..%lld "
              "ms), loss %.2f%% per message, protocol period %lld ms, ack timeout %lld ms, "
              "indirect probes %d, suspicion %d x ceil(log2(N+1)) periods, retransmit %d x "
              "ceil(log2(N+1)), at most %d updates a message\n\n",
              static_cast<unsigned long long>(f.seed), static_cast<unsigned long long>(f.seed),
              static_cast<long long>(f.rtt_ms), static_cast<long long>(f.rtt_ms / 2),
              static_cast<long long>(f.rtt_ms), 100 * f.loss, static_cast<long long>(f.period_ms),
              static_cast<long long>(f.ack_timeout_ms), f.indirect_probes, f.suspicion_mult,
              f.retransmit_mult, f.max_updates);
  std::printf("%7s | %9s %9s | %-18s | %-18s | %-20s | %7s | %7s %7s | %6s %6s | %6s %8s\n",
              "daemons", "sent/s", "recv/s", "first suspicion", "all suspect", "all DEAD",
              "timeout", "max upd", "upd/msg", "false", "refute", "wall s", "RSS MiB");
  std::printf("%7s | %9s %9s | %-18s | %-18s | %-20s | %7s | %7s %7s | %6s %6s | %6s %8s\n", "",
              "per dmn", "per dmn", "periods (ms)", "periods (ms)", "periods (ms)", "periods",
              "per msg", "steady", "susp.", "", "", "peak");
  std::vector<Result> results;
  for (int n : f.nodes) {
    const Result r = RunOnce(f, n, f.seed + n);
    results.push_back(r);
    std::printf("%7d | %9.2f %9.2f | %-18s | %-18s | %-20s | %7lld | %7zu %7.2f | %6llu %6llu | "
                "%6.1f %8.0f\n",
                r.nodes, r.sent_per_s, r.received_per_s,
                Periods(r.first_suspect_ms, f.period_ms).c_str(),
                Periods(r.all_suspect_ms, f.period_ms).c_str(),
                Periods(r.all_dead_ms, f.period_ms).c_str(),
                static_cast<long long>(r.dead_timeout_periods), r.max_updates,
                r.updates_per_message, static_cast<unsigned long long>(r.false_suspicions),
                static_cast<unsigned long long>(r.refutations), r.wall_s, r.peak_rss_mib);
    std::fflush(stdout);
  }
  std::printf(
      "\nsent/recv: membership messages (probes, ping-reqs, indirect acks, acks) per daemon per "
      "second over %d steady periods; the old all-to-all heartbeat sent N-1 requests per "
      "daemon per period.\nfirst suspicion / all suspect / all DEAD: from the kill of one "
      "daemon, until the first daemon suspected it, every other held it suspect (not live: "
      "its fragments count as erasures), every other held it DEAD. timeout: the suspicion "
      "timeout in periods; the DEAD column is about this plus the first suspicion and "
      "gossip.\nmax upd: the most updates one message carried in the whole run (the bound is "
      "%d). false susp.: suspicions raised about running daemons (loss), refute: their "
      "refutations.\n",
      f.steady_periods, f.max_updates);

  // Commit latency, in ms and in round trips, from the last protection of a step.
  auto rtts = [&](int64_t ms) {
    if (ms < 0) return std::string("never");
    char text[64];
    std::snprintf(text, sizeof(text), "%lld (%.1f RTT)", static_cast<long long>(ms),
                  f.rtt_ms > 0 ? double(ms) / f.rtt_ms : 0.0);
    return text[0] ? std::string(text) : std::string();
  };
  std::printf("\nper-job commits: a job of %d ranks on %d nodes (8 ranks a node), %d steps, "
              "reports re-sent every %lld ms; ms from the step's last protection\n",
              f.job_ranks, (f.job_ranks + 7) / 8, f.commit_steps,
              static_cast<long long>(f.period_ms));
  std::printf("%7s | %-18s %-18s | %-18s %-18s | %9s | %-22s\n", "daemons", "committed median",
              "committed max", "all know median", "all know max", "msgs/rank",
              "coordinator killed");
  for (const Result& r : results) {
    std::printf("%7d | %-18s %-18s | %-18s %-18s | %9.2f | %-22s\n", r.nodes,
                rtts(r.commit_median_ms).c_str(), rtts(r.commit_max_ms).c_str(),
                rtts(r.known_median_ms).c_str(), rtts(r.known_max_ms).c_str(),
                r.commit_messages_per_rank, rtts(r.takeover_commit_ms).c_str());
  }
  std::printf(
      "\ncommitted: the coordinator (rendezvous-hashed over the owner's live view) has every "
      "rank's report; all know: every node of the job has the commit (a reply or a push). "
      "msgs/rank: reports, replies and pushes per rank per step. coordinator killed: the "
      "coordinator dies as the step's last shard is protected; the owners re-send once their "
      "membership stops listing it (suspicion), and the next member in rendezvous order "
      "commits.\n");
  return 0;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) { return tessera::Main(argc, argv); }
