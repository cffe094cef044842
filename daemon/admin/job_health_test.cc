#include "daemon/admin/job_health.h"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

// A job of `world` ranks whose step `step` is protected RS(k, m) on the members other than each
// rank's owner ("n<rank % nodes>"); each owner also holds its sealed shard.
JobHoldings Protected(uint32_t world, int64_t step, uint32_t k, uint32_t m, int nodes,
                      uint32_t crc_base) {
  JobHoldings h;
  for (uint32_t rank = 0; rank < world; ++rank) {
    const int owner = static_cast<int>(rank) % nodes;
    h.shards.push_back({absl::StrCat("n", owner), rank, step, 0, 1000 + rank, crc_base + rank});
    for (uint32_t i = 0; i < k + m; ++i) {
      const int node = (owner + 1 + static_cast<int>(i)) % nodes;
      h.fragments.push_back(
          {absl::StrCat("n", node), rank, step, 0, i, k, m, 1000 + rank, crc_base + rank});
    }
  }
  return h;
}

ProtectionContext Cluster(size_t live, int k, int m) { return {true, live, k, m}; }

TEST(JobHealthTest, EveryFragmentHeldIsProtected) {
  JobView v = AssessJob("j", Protected(4, 20, 2, 1, 4, 7), 4, -1, Cluster(4, 2, 1));
  EXPECT_EQ(v.health, JobHealth::kProtected) << v.reason;
  EXPECT_EQ(v.reason, "");
  EXPECT_EQ(v.committed_step, 20);
  EXPECT_EQ(v.restorable_step, 20);
  EXPECT_EQ(v.newest_step, 20);
  EXPECT_EQ(v.k, 2u);
  EXPECT_EQ(v.m, 1u);
  EXPECT_EQ(v.nodes, (std::vector<std::string>{"n0", "n1", "n2", "n3"}));
  ASSERT_EQ(v.steps.size(), 1u);
  EXPECT_TRUE(v.steps[0].fully_protected);
}

TEST(JobHealthTest, MissingFragmentsDegradeAndBelowKIsUnprotected) {
  JobHoldings h = Protected(3, 10, 2, 1, 4, 1);
  // Rank 1 loses one fragment: still rebuildable, with less redundancy.
  h.fragments.erase(
      std::remove_if(h.fragments.begin(), h.fragments.end(),
                     [](const HeldFragment& f) { return f.rank == 1 && f.index == 0; }),
      h.fragments.end());
  JobView v = AssessJob("j", h, 3, 10, Cluster(4, 2, 1));
  EXPECT_EQ(v.health, JobHealth::kDegraded);
  EXPECT_THAT(v.reason, HasSubstr("step 10: rank 1: 2 of 3 fragments on live members"));
  // And a second one: below k, only the owner's shard is left.
  h.fragments.erase(
      std::remove_if(h.fragments.begin(), h.fragments.end(),
                     [](const HeldFragment& f) { return f.rank == 1 && f.index == 1; }),
      h.fragments.end());
  v = AssessJob("j", h, 3, 10, Cluster(4, 2, 1));
  EXPECT_EQ(v.health, JobHealth::kUnprotected);
  EXPECT_THAT(v.reason, HasSubstr("rank 1: 1 fragments on live members, 2 needed to rebuild it"));
  EXPECT_EQ(v.restorable_step, 10);  // the shard itself is still there
}

TEST(JobHealthTest, ReducedCodingIsDegraded) {
  JobView v = AssessJob("j", Protected(2, 5, 1, 1, 3, 1), 2, -1, Cluster(3, 2, 1));
  EXPECT_EQ(v.health, JobHealth::kDegraded);
  EXPECT_THAT(v.reason, HasSubstr("RS(1, 1) in effect instead of the configured RS(2, 1) (3 live "
                                  "members)"));
}

TEST(JobHealthTest, StandaloneAndSingleMemberAreUnprotected) {
  JobHoldings h;
  h.shards.push_back({"solo", 0, 3, 1, 100, 9});
  JobView v = AssessJob("j", h, 1, 3, ProtectionContext{false, 1, 3, 2});
  EXPECT_EQ(v.health, JobHealth::kUnprotected);
  EXPECT_THAT(v.reason, HasSubstr("standalone daemon"));
  v = AssessJob("j", h, 1, 3, Cluster(1, 3, 2));
  EXPECT_THAT(v.reason, HasSubstr("only live member"));
}

TEST(JobHealthTest, NothingProtectedYetNamesTheNewestStep) {
  JobHoldings h;
  h.shards.push_back({"n0", 0, 8, 2, 100, 9});
  h.shards.push_back({"n1", 1, 8, 2, 100, 10});
  JobView v = AssessJob("j", h, 2, -1, Cluster(3, 1, 1));
  EXPECT_EQ(v.health, JobHealth::kUnprotected);
  EXPECT_THAT(v.reason, HasSubstr("no step is protected on every rank yet (newest step 8)"));
  EXPECT_EQ(v.restorable_step, 8);
  EXPECT_EQ(v.committed_step, -1);
}

TEST(JobHealthTest, MissingRankMakesAStepUnrestorable) {
  JobHoldings h = Protected(4, 30, 2, 1, 4, 1);
  JobHoldings older = Protected(4, 20, 2, 1, 4, 50);
  h.shards.insert(h.shards.end(), older.shards.begin(), older.shards.end());
  h.fragments.insert(h.fragments.end(), older.fragments.begin(), older.fragments.end());
  // Rank 3 of step 30 is gone everywhere.
  auto gone = [](int64_t step, uint32_t rank) {
    return [=](const auto& x) { return x.step == step && x.rank == rank; };
  };
  h.shards.erase(std::remove_if(h.shards.begin(), h.shards.end(), gone(30, 3)), h.shards.end());
  h.fragments.erase(std::remove_if(h.fragments.begin(), h.fragments.end(), gone(30, 3)),
                    h.fragments.end());
  JobView v = AssessJob("j", h, 0, 20, Cluster(4, 2, 1));
  EXPECT_EQ(v.world_size, 4u);  // from the ranks held at step 20
  EXPECT_EQ(v.newest_step, 30);
  EXPECT_EQ(v.restorable_step, 20);
  EXPECT_EQ(v.committed_step, 20);
  EXPECT_EQ(v.health, JobHealth::kProtected) << v.reason;
  ASSERT_EQ(v.steps.size(), 2u);
  EXPECT_EQ(v.steps[0].step, 30);  // newest first
  EXPECT_EQ(v.steps[0].missing_ranks, (std::vector<uint32_t>{3}));
  EXPECT_FALSE(v.steps[0].restorable);
}

TEST(JobHealthTest, FragmentsOfAnotherCodingDoNotCount) {
  // Random loss patterns: a rank stays restorable exactly while k agreeing fragments remain.
  const char* env = std::getenv("TESSERA_TEST_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("TESSERA_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 200; ++round) {
    const uint32_t k = 1 + rng() % 4, m = rng() % 3;
    JobHoldings h = Protected(1, 1, k, m, static_cast<int>(k + m + 1), 77);
    h.shards.clear();
    // A stray fragment of another coding (another shard CRC, k + 1) must not be counted.
    h.fragments.push_back({"stale", 0, 1, 0, 0, k + 1, m, 1000, 12345});
    uint32_t kept = k + m;
    for (uint32_t i = 0; i < k + m; ++i) {
      if (rng() % 2 == 0) {
        h.fragments.erase(std::remove_if(h.fragments.begin(), h.fragments.end(),
                                         [&](const HeldFragment& f) {
                                           return f.index == i && f.shard_crc32c == 77;
                                         }),
                          h.fragments.end());
        --kept;
      }
    }
    JobView v = AssessJob("j", h, 1, -1, Cluster(k + m + 1, k, m));
    ASSERT_EQ(v.steps.size(), 1u);
    ASSERT_EQ(v.steps[0].ranks.size(), 1u);
    const RankAtStep& r = v.steps[0].ranks[0];
    if (kept >= 1) {
      EXPECT_EQ(r.shard_crc32c, 77u) << "seed " << seed << " round " << round;
    }
    EXPECT_EQ(r.restorable, kept >= k) << "seed " << seed << " round " << round;
  }
}

}  // namespace
}  // namespace tessera
