// cluster_sim: N real Swim cores (daemon/swim.h) over a simulated network and clock
// (daemon/swim_sim.h), deterministic from the seed it prints. For each N it reports the steady
// cost of membership per daemon, how long a killed daemon takes to be suspected and then known
// DEAD by every other member, and the largest message in piggybacked updates.
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
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "daemon/swim.h"
#include "daemon/swim_sim.h"

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
};

// ---------------------------------------------------------------------------------------------
// PER-JOB COMMIT SIMULATION: TO BE ADDED.
// Called once every protocol period of simulated time, after membership has advanced to now_ms,
// with read access to every daemon's Swim (its live view: Members(), live_count(), IsFenced()).
// A per-job commit model (placement of fragments on the live members, commit of a step once
// every rank is protected, restores after the kill) goes here; it must stay deterministic (draw
// only from the simulation's seed) and cheap per period for 10,000 daemons.
void SimulateJobCommits(const SwimSimulation& sim, int64_t now_ms) {
  (void)sim;
  (void)now_ms;
}
// ---------------------------------------------------------------------------------------------

double PeakRssMib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;
}

std::string NodeId(int i) { return absl::StrCat("n", i); }
// At most 15 characters: short-string storage, no allocation per copy.
std::string NodeAddress(int i) {
  return absl::StrCat("10.", i / 65536, ".", (i / 256) % 256, ".", i % 256, ":70");
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
      SimulateJobCommits(sim, sim.now_ms());
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

  victim = static_cast<int>(rng() % n);
  killed_at = sim.now_ms();
  sim.Kill(victim);
  saw_suspect[victim] = saw_dead[victim] = 1;  // not counted: n - 1 others
  int log2 = 0;
  while ((int64_t{1} << log2) < n + 1) ++log2;
  r.dead_timeout_periods = int64_t{flags.suspicion_mult} * log2;
  run_periods(static_cast<int>(3 * r.dead_timeout_periods + 20),
              [&] { return dead_holders == n - 1; });

  for (int i = 0; i < n; ++i) r.refutations += sim.swim(i).stats().refutations;
  r.false_suspicions = false_suspicions;
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
                   "[--retransmit_mult=4] [--max_updates=16] [--steady_periods=20]\n",
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
  for (int n : f.nodes) {
    const Result r = RunOnce(f, n, f.seed + n);
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
  return 0;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) { return tessera::Main(argc, argv); }
