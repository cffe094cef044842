// Swim cores over SwimSimulation's in-memory network with loss: join, detection, refutation,
// zombie fencing, bounded messages, a dead member re-joining as a new incarnation, an operator's
// DeclareLost, and bad input. Every run is deterministic from the seed printed (set
// TESSERA_TEST_SEED to repeat one). Bounds on simulated time only say "eventually": each is many
// times what the protocol needs.
#include "daemon/membership/swim.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "daemon/membership/swim_sim.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

constexpr int64_t kPeriodMs = 100;

uint64_t TestSeed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("TESSERA_TEST_SEED");
    const uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::printf("seed=%llu (set TESSERA_TEST_SEED to repeat)\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

std::string Id(int i) { return absl::StrCat("n", i); }
std::string Address(int i) { return absl::StrCat("10.0.0.", i, ":7070"); }

Swim::Options DaemonOptions(int i, uint64_t incarnation, std::vector<std::string> seeds) {
  Swim::Options o;
  o.self_id = Id(i);
  o.self_incarnation = incarnation;
  o.self_address = Address(i);
  o.protocol_period_ms = kPeriodMs;
  o.ack_timeout_ms = 40;
  o.random_seed = TestSeed() * 1000 + i;
  o.seeds = std::move(seeds);
  return o;
}

// The node ids `swim` holds alive, itself included, sorted.
std::vector<std::string> Live(const Swim& swim) {
  std::vector<std::string> ids = {swim.options().self_id};
  for (const Swim::MemberView& m : swim.Members()) {
    if (m.state == SwimState::kAlive) ids.push_back(m.node_id);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

SwimState StateIn(const Swim& swim, const std::string& node_id) {
  std::optional<Swim::MemberView> m = swim.Find(node_id);
  return m ? m->state : SwimState::kDead;
}

class SwimTest : public ::testing::Test {
 protected:
  // `n` daemons started together, each knowing only daemon 0's address (daemon 0 knows none).
  // `bound`: Options::bound_relayed_news on every daemon (as under mutual TLS).
  void Start(int n, double loss, int max_updates = 16, bool bound = false) {
    events_.clear();
    SwimSimulation::Options so;
    so.seed = TestSeed();
    so.one_way_ms = 2;
    so.jitter_ms = 3;
    so.loss_rate = loss;
    sim_ = std::make_unique<SwimSimulation>(so);
    for (int i = 0; i < n; ++i) {
      Swim::Options o = DaemonOptions(i, 1000 + i, i == 0 ? std::vector<std::string>{}
                                                          : std::vector<std::string>{Address(0)});
      o.max_updates_per_message = max_updates;
      o.bound_relayed_news = bound;
      Add(std::move(o));
    }
  }
  size_t Add(Swim::Options o) {
    const size_t index = sim_->size();
    o.on_event = [this, index](const Swim::Event& e) { events_[index].push_back(e); };
    events_.emplace_back();
    return sim_->Add(std::move(o));
  }
  // Runs until every running, connected daemon in `among` sees exactly `expected` alive.
  bool Converge(const std::vector<size_t>& among, const std::vector<std::string>& expected,
                int64_t within_ms) {
    return sim_->RunUntil(sim_->now_ms() + within_ms, [&] {
      for (size_t i : among) {
        if (Live(sim_->swim(i)) != expected) return false;
      }
      return true;
    });
  }
  std::vector<size_t> All() const {
    std::vector<size_t> all;
    for (size_t i = 0; i < sim_->size(); ++i) all.push_back(i);
    return all;
  }
  std::vector<std::string> Ids(int n) const {
    std::vector<std::string> ids;
    for (int i = 0; i < n; ++i) ids.push_back(Id(i));
    std::sort(ids.begin(), ids.end());
    return ids;
  }
  int Count(size_t daemon, Swim::Event::Kind kind, const std::string& node_id) const {
    return static_cast<int>(std::count_if(
        events_[daemon].begin(), events_[daemon].end(),
        [&](const Swim::Event& e) { return e.kind == kind && e.node_id == node_id; }));
  }

  // A probe from daemon `from` as it is (its node id, incarnation, version and address: what
  // the transport authenticates), carrying `updates` it makes up, handed to daemon `to`.
  void Relay(size_t from, size_t to, std::vector<SwimUpdate> updates) {
    const Swim& rogue = sim_->swim(from);
    SwimMessage m;
    m.kind = SwimMessage::Kind::kProbe;
    m.seq = ++rogue_seq_;
    m.from_id = rogue.options().self_id;
    m.from_incarnation = rogue.options().self_incarnation;
    m.from_version = rogue.self_version();
    m.from_address = rogue.options().self_address;
    m.known_members = static_cast<uint32_t>(rogue.known_count());
    m.updates = std::move(updates);
    ASSERT_TRUE(sim_->swim(to).HandleRequest(sim_->now_ms(), m).ok());
  }

  std::unique_ptr<SwimSimulation> sim_;
  std::vector<std::vector<Swim::Event>> events_;
  uint64_t rogue_seq_ = 1u << 30;
};

TEST_F(SwimTest, DaemonsJoinThroughOneSeedDespiteLoss) {
  Start(12, /*loss=*/0.05);
  ASSERT_TRUE(Converge(All(), Ids(12), 200 * kPeriodMs)) << "seed " << TestSeed();
  std::vector<Swim::Stats> before;
  for (size_t i = 0; i < sim_->size(); ++i) {
    EXPECT_TRUE(sim_->swim(i).Converged()) << Id(i);
    EXPECT_EQ(Count(i, Swim::Event::Kind::kJoined, Id((i + 1) % 12)), 1) << Id(i);
    before.push_back(sim_->swim(i).stats());
  }
  // Steady cost: one probe of its own a period (the others answer ping-reqs), whatever the size.
  sim_->RunUntil(sim_->now_ms() + 100 * kPeriodMs);
  for (size_t i = 0; i < sim_->size(); ++i) {
    const Swim::Stats& s = sim_->swim(i).stats();
    const Swim::Stats& b = before[i];
    EXPECT_LE((s.probes_sent - b.probes_sent) - (s.ping_reqs_received - b.ping_reqs_received),
              s.periods - b.periods)
        << Id(i);
  }
}

TEST_F(SwimTest, KilledMemberIsSuspectedThenDeadEverywhere) {
  Start(10, /*loss=*/0.02);
  ASSERT_TRUE(Converge(All(), Ids(10), 200 * kPeriodMs)) << "seed " << TestSeed();
  sim_->Kill(7);
  std::vector<size_t> others;
  for (size_t i = 0; i < 10; ++i) {
    if (i != 7) others.push_back(i);
  }
  ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 400 * kPeriodMs, [&] {
    for (size_t i : others) {
      if (StateIn(sim_->swim(i), Id(7)) != SwimState::kDead) return false;
    }
    return true;
  })) << "seed " << TestSeed();
  uint64_t raised = 0;
  for (size_t i : others) {
    raised += sim_->swim(i).stats().suspicions_raised;
    // Everyone saw the suspicion before the death (gossip carries both).
    auto first = [&](Swim::Event::Kind kind) {
      return std::find_if(events_[i].begin(), events_[i].end(), [&](const Swim::Event& e) {
        return e.kind == kind && e.node_id == Id(7);
      });
    };
    EXPECT_LT(first(Swim::Event::Kind::kSuspect), first(Swim::Event::Kind::kDead)) << Id(i);
    EXPECT_EQ(sim_->swim(i).live_count(), 9u) << Id(i);
  }
  EXPECT_GE(raised, 1u);
  // The others stay alive to each other (false suspicions from loss are refuted).
  std::vector<std::string> expected = Ids(10);
  expected.erase(std::find(expected.begin(), expected.end(), Id(7)));
  EXPECT_TRUE(Converge(others, expected, 200 * kPeriodMs)) << "seed " << TestSeed();
}

TEST_F(SwimTest, SuspectedOrDeadMemberRefutesWhenItIsHeardAgain) {
  Start(8, /*loss=*/0.0);
  ASSERT_TRUE(Converge(All(), Ids(8), 200 * kPeriodMs));
  // Cut off long enough to be suspected, then back: it refutes the suspicion.
  sim_->Partition(3, true);
  ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 200 * kPeriodMs, [&] {
    return StateIn(sim_->swim(0), Id(3)) == SwimState::kSuspect;
  }));
  sim_->Partition(3, false);
  ASSERT_TRUE(Converge(All(), Ids(8), 200 * kPeriodMs)) << "seed " << TestSeed();
  EXPECT_GE(sim_->swim(3).stats().refutations, 1u);
  const uint64_t version = sim_->swim(3).self_version();
  EXPECT_GE(version, 1u);
  EXPECT_EQ(sim_->swim(0).Find(Id(3))->version, version);

  // Cut off until declared dead everywhere, then back (a SIGSTOPped daemon resumed): its own
  // probes bring it the news, it refutes, and everyone takes it back.
  sim_->Partition(3, true);
  ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 400 * kPeriodMs, [&] {
    for (size_t i = 0; i < 8; ++i) {
      if (i != 3 && StateIn(sim_->swim(i), Id(3)) != SwimState::kDead) return false;
    }
    return true;
  }));
  sim_->Partition(3, false);
  ASSERT_TRUE(Converge(All(), Ids(8), 400 * kPeriodMs)) << "seed " << TestSeed();
  EXPECT_GT(sim_->swim(3).self_version(), version);
  EXPECT_GE(Count(0, Swim::Event::Kind::kAlive, Id(3)), 1);
}

TEST_F(SwimTest, NewIncarnationFencesTheZombie) {
  Start(6, /*loss=*/0.02);
  ASSERT_TRUE(Converge(All(), Ids(6), 200 * kPeriodMs));
  // n2 hangs (cut off); its node id starts again elsewhere as a new incarnation.
  sim_->Partition(2, true);
  Swim::Options o = DaemonOptions(2, 5000, {Address(0)});
  o.self_address = "10.0.1.2:7070";
  const size_t fresh = Add(std::move(o));
  std::vector<size_t> current = {0, 1, 3, 4, 5, fresh};
  ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 200 * kPeriodMs, [&] {
    for (size_t i : current) {
      if (i != fresh && sim_->swim(i).Find(Id(2))->incarnation != 5000) return false;
    }
    return true;
  })) << "seed " << TestSeed();
  ASSERT_TRUE(Converge(current, Ids(6), 200 * kPeriodMs)) << "seed " << TestSeed();
  for (size_t i : current) {
    if (i == fresh) continue;
    EXPECT_EQ(sim_->swim(i).Find(Id(2))->incarnation, 5000u);
    EXPECT_EQ(sim_->swim(i).Find(Id(2))->address, "10.0.1.2:7070");
    EXPECT_TRUE(sim_->swim(i).IsFenced(Id(2), 1002));
    EXPECT_FALSE(sim_->swim(i).IsFenced(Id(2), 5000));
  }
  EXPECT_EQ(Count(0, Swim::Event::Kind::kReplaced, Id(2)), 1);
  // The zombie comes back: its messages are refused, it learns it is fenced, and it is never
  // alive again anywhere.
  sim_->Partition(2, false);
  sim_->RunUntil(sim_->now_ms() + 100 * kPeriodMs);
  EXPECT_TRUE(sim_->swim(2).self_fenced());
  EXPECT_GT(sim_->counters().refused, 0u);
  for (size_t i : current) {
    EXPECT_EQ(Live(sim_->swim(i)), Ids(6)) << i;
    if (i != fresh) {
      EXPECT_EQ(sim_->swim(i).Find(Id(2))->incarnation, 5000u) << i;
    }
  }
  // A message straight from the zombie is refused, naming the newer incarnation.
  SwimMessage probe;
  probe.from_id = Id(2);
  probe.from_incarnation = 1002;
  probe.from_address = Address(2);
  auto refused = sim_->swim(0).HandleRequest(sim_->now_ms(), probe);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("incarnation 5000"), std::string::npos)
      << refused.status();
}

TEST_F(SwimTest, MessagesCarryAtMostTheConfiguredNumberOfUpdates) {
  // 40 daemons joining at once make far more news than a message may carry.
  Start(40, /*loss=*/0.01, /*max_updates=*/4);
  ASSERT_TRUE(Converge(All(), Ids(40), 1000 * kPeriodMs)) << "seed " << TestSeed();
  EXPECT_EQ(sim_->counters().max_updates, 4u);
  for (size_t i = 0; i < sim_->size(); ++i) {
    EXPECT_LE(sim_->swim(i).stats().max_updates_in_message, 4u);
  }
}

TEST_F(SwimTest, DeadMemberRejoinsAsANewIncarnationAtTheSameAddress) {
  Start(6, /*loss=*/0.02);
  ASSERT_TRUE(Converge(All(), Ids(6), 200 * kPeriodMs));
  sim_->Kill(4);
  ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 400 * kPeriodMs, [&] {
    return StateIn(sim_->swim(0), Id(4)) == SwimState::kDead &&
           StateIn(sim_->swim(5), Id(4)) == SwimState::kDead;
  }));
  // Restarted on the same host: same node id and address, a later start time.
  const size_t restarted = Add(DaemonOptions(4, 9000, {Address(0)}));
  std::vector<size_t> running = {0, 1, 2, 3, 5, restarted};
  ASSERT_TRUE(Converge(running, Ids(6), 200 * kPeriodMs)) << "seed " << TestSeed();
  for (size_t i : running) {
    if (i == restarted) continue;
    EXPECT_EQ(sim_->swim(i).Find(Id(4))->incarnation, 9000u) << i;
    EXPECT_TRUE(sim_->swim(i).IsFenced(Id(4), 1004)) << i;
  }
}

TEST_F(SwimTest, DeclaredLostStaysDeadUntilANewIncarnation) {
  Start(5, /*loss=*/0.0);
  ASSERT_TRUE(Converge(All(), Ids(5), 200 * kPeriodMs));
  ASSERT_TRUE(sim_->swim(0).DeclareLost(sim_->now_ms(), Id(3)).ok());
  EXPECT_EQ(sim_->swim(0).DeclareLost(sim_->now_ms(), "nX").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(sim_->swim(0).DeclareLost(sim_->now_ms(), Id(0)).code(),
            absl::StatusCode::kInvalidArgument);
  // n3 keeps running but cannot refute.
  std::vector<std::string> without = {Id(0), Id(1), Id(2), Id(4)};
  ASSERT_TRUE(Converge({0, 1, 2, 4}, without, 200 * kPeriodMs)) << "seed " << TestSeed();
  sim_->RunUntil(sim_->now_ms() + 100 * kPeriodMs);
  EXPECT_TRUE(sim_->swim(3).self_lost());
  for (size_t i : {0, 1, 2, 4}) {
    EXPECT_EQ(Live(sim_->swim(i)), without) << i;
    EXPECT_TRUE(sim_->swim(i).Find(Id(3))->lost) << i;
  }
  sim_->Kill(3);
  const size_t restarted = Add(DaemonOptions(3, 7000, {Address(0)}));
  ASSERT_TRUE(Converge({0, 1, 2, 4, restarted}, Ids(5), 200 * kPeriodMs)) << TestSeed();
}

// Bounded gossip (as under mutual TLS): a member that relays, of another member's current
// incarnation, a death at the lost version, a death just below it (which the member cannot
// refute) or a suspicion far above the member's own version pins nothing: the member stays alive
// everywhere and is not lost. SWIM's rules (off) take each of them: the member is lost everywhere
// and gives up.
TEST_F(SwimTest, BoundedGossipAMemberCannotRelayAnotherLostOrBeyondRefutation) {
  for (bool bound : {false, true}) {
    SCOPED_TRACE(bound ? "bounded" : "SWIM's rules");
    Start(5, /*loss=*/0.0, 16, bound);
    ASSERT_TRUE(Converge(All(), Ids(5), 200 * kPeriodMs)) << "seed " << TestSeed();
    const uint64_t incarnation = sim_->swim(1).options().self_incarnation;
    for (size_t to : {0, 1, 2, 3}) {
      Relay(4, to, {SwimUpdate{SwimState::kSuspect, Id(1), incarnation, 1u << 30, Address(1)}});
      Relay(4, to,
            {SwimUpdate{SwimState::kDead, Id(1), incarnation, Swim::kLostVersion - 1, Address(1)}});
      Relay(4, to,
            {SwimUpdate{SwimState::kDead, Id(1), incarnation, Swim::kLostVersion, Address(1)}});
    }
    sim_->RunUntil(sim_->now_ms() + 100 * kPeriodMs);
    if (!bound) {
      EXPECT_TRUE(sim_->swim(1).self_lost());
      for (size_t i : {0, 2, 3}) {
        EXPECT_TRUE(sim_->swim(i).Find(Id(1))->lost) << i;
        EXPECT_EQ(StateIn(sim_->swim(i), Id(1)), SwimState::kDead) << i;
      }
      continue;
    }
    EXPECT_FALSE(sim_->swim(1).self_lost());
    EXPECT_FALSE(sim_->swim(1).self_fenced());
    for (size_t i : {0, 2, 3, 4}) {
      EXPECT_FALSE(sim_->swim(i).Find(Id(1))->lost) << i;
      EXPECT_EQ(StateIn(sim_->swim(i), Id(1)), SwimState::kAlive) << i;
      EXPECT_EQ(Count(i, Swim::Event::Kind::kDead, Id(1)), 0) << i;
      EXPECT_LT(sim_->swim(i).Find(Id(1))->version, 8u) << i;
    }
    for (size_t i : {0, 1, 2, 3}) EXPECT_GE(sim_->swim(i).stats().relayed_dropped, 2u) << i;
    EXPECT_EQ(Live(sim_->swim(0)), Ids(5));
  }
}

// Bounded gossip: a member that keeps relaying, every period, the strongest news the bound lets
// through (a suspicion and a death of another member at the version each receiver holds from
// that member's own word) never gets it declared dead anywhere: each is taken as a suspicion
// that the member's refutation clears within the suspicion timeout. Under SWIM's rules the same
// member makes it dead at once (a death one version above the member's own).
TEST_F(SwimTest, BoundedGossipEveryRelayedSuspicionIsClearedByARefutation) {
  for (bool bound : {false, true}) {
    SCOPED_TRACE(bound ? "bounded" : "SWIM's rules");
    Start(6, /*loss=*/0.0, 16, bound);
    ASSERT_TRUE(Converge(All(), Ids(6), 200 * kPeriodMs)) << "seed " << TestSeed();
    const uint64_t incarnation = sim_->swim(1).options().self_incarnation;
    bool dead_somewhere = false;
    for (int period = 0; period < 200 && !dead_somewhere; ++period) {
      for (size_t to : {0, 2, 3, 4}) {
        const uint64_t held = sim_->swim(to).Find(Id(1))->version;
        Relay(5, to, {SwimUpdate{SwimState::kSuspect, Id(1), incarnation, held, Address(1)}});
        Relay(5, to,
              {SwimUpdate{SwimState::kDead, Id(1), incarnation, held + (bound ? 0 : 1),
                          Address(1)}});
      }
      sim_->RunUntil(sim_->now_ms() + kPeriodMs);
      for (size_t i : {0, 2, 3, 4}) {
        dead_somewhere = dead_somewhere || StateIn(sim_->swim(i), Id(1)) == SwimState::kDead;
      }
    }
    if (!bound) {
      EXPECT_TRUE(dead_somewhere);
      continue;
    }
    EXPECT_FALSE(dead_somewhere) << "seed " << TestSeed();
    EXPECT_GE(sim_->swim(1).stats().refutations, 1u);
    // Once it stops, every view has n1 alive again.
    EXPECT_TRUE(Converge(All(), Ids(6), 200 * kPeriodMs)) << "seed " << TestSeed();
  }
}

// A member that relays a suspicion of another at the version each daemon holds, every period,
// flaps it (suspected, then refuted) on every daemon again and again under SWIM's rules. Under
// bounded gossip each daemon takes such a relayed suspicion at most Swim::kMaxFlaps times per
// flap window; past that it only probes the member itself. The member is still found dead
// everywhere when it does die while the suspicions go on.
TEST_F(SwimTest, BoundedGossipARelayingMemberFlapsAnotherAtMostAFewTimesPerWindow) {
  constexpr int kPeriods = 150;  // 1.5 flap windows
  int suspicions[2] = {0, 0};
  for (bool bound : {false, true}) {
    SCOPED_TRACE(bound ? "bounded" : "SWIM's rules");
    Start(6, /*loss=*/0.0, 16, bound);
    ASSERT_TRUE(Converge(All(), Ids(6), 200 * kPeriodMs)) << "seed " << TestSeed();
    const uint64_t incarnation = sim_->swim(1).options().self_incarnation;
    std::vector<int> before;
    for (size_t i = 0; i < sim_->size(); ++i) {
      before.push_back(Count(i, Swim::Event::Kind::kSuspect, Id(1)));
    }
    auto relay = [&] {
      for (size_t to : {0, 2, 3, 4}) {
        const uint64_t held = sim_->swim(to).Find(Id(1))->version;
        for (uint64_t v : {held, held > 0 ? held - 1 : 0}) {
          Relay(5, to, {SwimUpdate{SwimState::kSuspect, Id(1), incarnation, v, Address(1)}});
        }
      }
    };
    int most = 0;
    for (int period = 0; period < kPeriods; ++period) {
      relay();
      sim_->RunUntil(sim_->now_ms() + kPeriodMs);
    }
    for (size_t i : {0, 2, 3, 4}) {
      const int flaps = Count(i, Swim::Event::Kind::kSuspect, Id(1)) - before[i];
      most = std::max(most, flaps);
      EXPECT_NE(StateIn(sim_->swim(i), Id(1)), SwimState::kDead) << "on n" << i;
    }
    suspicions[bound] = most;
    if (bound) {
      // 1.5 windows: at most kMaxFlaps in each, and the one being refuted at the end.
      EXPECT_LE(most, static_cast<int>(2 * Swim::kMaxFlaps + 1)) << "seed " << TestSeed();
      EXPECT_GT(sim_->swim(0).stats().relayed_damped, 0u);
    }
    // n1 dies while the suspicions go on: every other daemon still finds it dead.
    sim_->Kill(1);
    bool dead_everywhere = false;
    for (int period = 0; period < 400 && !dead_everywhere; ++period) {
      relay();
      sim_->RunUntil(sim_->now_ms() + kPeriodMs);
      dead_everywhere = true;
      for (size_t i : {0, 2, 3, 4}) {
        dead_everywhere = dead_everywhere && StateIn(sim_->swim(i), Id(1)) == SwimState::kDead;
      }
    }
    EXPECT_TRUE(dead_everywhere) << "seed " << TestSeed();
  }
  std::cout << "most suspicions of n1 on one daemon in " << kPeriods
            << " periods: " << suspicions[0] << " (SWIM's rules), " << suspicions[1]
            << " (bounded gossip); seed " << TestSeed() << "\n";
  EXPECT_GT(suspicions[0], 4 * suspicions[1]) << "seed " << TestSeed();
}

// Bounded gossip keeps SWIM's detection and refutation: a killed member is dead everywhere, a
// partitioned one that comes back refutes, and a restarted one fences its zombie.
TEST_F(SwimTest, BoundedGossipStillDetectsRefutesAndFences) {
  Start(8, /*loss=*/0.02, 16, /*bound=*/true);
  ASSERT_TRUE(Converge(All(), Ids(8), 200 * kPeriodMs)) << "seed " << TestSeed();
  sim_->Partition(3, true);
  ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 200 * kPeriodMs, [&] {
    return StateIn(sim_->swim(0), Id(3)) != SwimState::kAlive;
  })) << "seed " << TestSeed();
  sim_->Partition(3, false);
  ASSERT_TRUE(Converge(All(), Ids(8), 400 * kPeriodMs)) << "seed " << TestSeed();
  EXPECT_GE(sim_->swim(3).stats().refutations, 1u);
  sim_->Kill(7);
  std::vector<size_t> others = {0, 1, 2, 3, 4, 5, 6};
  ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 600 * kPeriodMs, [&] {
    for (size_t i : others) {
      if (StateIn(sim_->swim(i), Id(7)) != SwimState::kDead) return false;
    }
    return true;
  })) << "seed " << TestSeed();
  Swim::Options restarted = DaemonOptions(5, 9000, {Address(0)});
  restarted.bound_relayed_news = true;
  restarted.self_address = "10.0.1.5:7070";
  Add(std::move(restarted));
  ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 400 * kPeriodMs, [&] {
    if (!sim_->swim(5).self_fenced()) return false;
    for (size_t i : {0, 1, 2, 3, 4, 6}) {
      if (!sim_->swim(i).IsFenced(Id(5), 1005)) return false;
    }
    return true;
  })) << "seed " << TestSeed();
}

// Bounded gossip detects a death as fast as SWIM's rules when the member refuted a suspicion
// just before it died: most daemons then hold its refutation only as relayed news, so their own
// word from it is a version behind, and the suspicions relayed at its new version are over the
// bound. Each such suspicion makes the daemon probe the member itself next, which fails: its own
// suspicion, not a wait for its probe round to reach the member (up to n periods).
TEST_F(SwimTest, BoundedGossipDetectsADeathRightAfterARefutationAsFastAsSwim) {
  constexpr int kDaemons = 48;
  int64_t detected_ms[2] = {0, 0};
  for (bool bound : {false, true}) {
    SCOPED_TRACE(bound ? "bounded" : "SWIM's rules");
    Start(kDaemons, /*loss=*/0.0, 16, bound);
    ASSERT_TRUE(Converge(All(), Ids(kDaemons), 400 * kPeriodMs)) << "seed " << TestSeed();
    const uint64_t incarnation = sim_->swim(1).options().self_incarnation;
    // n2 tells n1 it suspects it: n1 refutes at a version one higher, which spreads as gossip.
    Relay(2, 1, {SwimUpdate{SwimState::kSuspect, Id(1), incarnation, sim_->swim(1).self_version(),
                            Address(1)}});
    const uint64_t refuted = sim_->swim(1).self_version();
    ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 100 * kPeriodMs, [&] {
      for (size_t i = 2; i < sim_->size(); ++i) {
        if (sim_->swim(i).Find(Id(1))->version < refuted) return false;
      }
      return true;
    })) << "seed " << TestSeed();
    sim_->Kill(1);
    const int64_t killed = sim_->now_ms();
    ASSERT_TRUE(sim_->RunUntil(sim_->now_ms() + 2000 * kPeriodMs, [&] {
      for (size_t i = 0; i < sim_->size(); ++i) {
        if (i != 1 && StateIn(sim_->swim(i), Id(1)) != SwimState::kDead) return false;
      }
      return true;
    })) << "seed " << TestSeed();
    detected_ms[bound] = sim_->now_ms() - killed;
  }
  std::cout << "n1 dead everywhere after " << detected_ms[0] / kPeriodMs << " periods (SWIM's rules), "
            << detected_ms[1] / kPeriodMs << " (bounded gossip); seed " << TestSeed() << "\n";
  EXPECT_LE(detected_ms[1], 2 * detected_ms[0] + 10 * kPeriodMs) << "seed " << TestSeed();
}

TEST_F(SwimTest, SameSeedSameHistory) {
  auto run = [this] {
    Start(16, /*loss=*/0.05);
    sim_->RunUntil(50 * kPeriodMs);
    sim_->Kill(5);
    sim_->RunUntil(150 * kPeriodMs);
    std::vector<uint64_t> trace;
    for (size_t i = 0; i < sim_->size(); ++i) {
      const Swim::Stats& s = sim_->swim(i).stats();
      trace.insert(trace.end(), {s.messages_sent(), s.updates_sent, s.suspicions_raised,
                                 s.refutations, events_[i].size()});
    }
    events_.clear();
    return trace;
  };
  EXPECT_EQ(run(), run()) << "seed " << TestSeed();
}

TEST(SwimErrorsTest, BadOptionsAndBadRequestsAreNamed) {
  Swim::Options o = DaemonOptions(1, 10, {});
  EXPECT_EQ(Swim::ValidateOptions(o).code(), absl::StatusCode::kInvalidArgument)
      << "send is required";
  o.send = [](const std::string&, SwimMessage&&) {};
  ASSERT_TRUE(Swim::ValidateOptions(o).ok());
  Swim::Options bad = o;
  bad.ack_timeout_ms = 2 * kPeriodMs;
  EXPECT_NE(Swim::ValidateOptions(bad).message().find("ack_timeout_ms"), std::string::npos);
  bad = o;
  bad.self_incarnation = 0;
  EXPECT_NE(Swim::ValidateOptions(bad).message().find("non-zero self_incarnation"),
            std::string::npos);
  bad = o;
  bad.indirect_probes = 17;
  EXPECT_NE(Swim::ValidateOptions(bad).message().find("indirect_probes must be 0 to 16; got 17"),
            std::string::npos)
      << Swim::ValidateOptions(bad);

  Swim swim(o);
  SwimMessage m;
  m.from_id = "x";
  m.from_address = "h:1";
  auto r = swim.HandleRequest(0, m);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("non-zero incarnation"), std::string::npos) << r.status();
  m.from_incarnation = 3;
  m.kind = SwimMessage::Kind::kPingReq;
  EXPECT_EQ(swim.HandleRequest(0, m).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(swim.Members().empty()) << "a refused request changed nothing";
  m.kind = SwimMessage::Kind::kProbe;
  auto ack = swim.HandleRequest(0, m);
  ASSERT_TRUE(ack.ok()) << ack.status();
  EXPECT_EQ(ack->kind, SwimMessage::Kind::kAck);
  ASSERT_TRUE(swim.Find("x").has_value());
  // Every request is idempotent: the same probe twice changes nothing more.
  const size_t known = swim.known_count();
  ASSERT_TRUE(swim.HandleRequest(0, m).ok());
  EXPECT_EQ(swim.known_count(), known);
}

}  // namespace
}  // namespace tessera
